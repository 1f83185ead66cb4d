"""Inbound ESP (RFC 4303 3.4): replay check, ICV, decryption, padding, inbound policy.

`decapsulate_untrusted(esp)` takes an ESP packet (SPI .. ICV, as read from UDP/4500
after classification or from a raw protocol-50 socket) and returns the IP packet to
write into the TUN device. Every failure raises EspDrop after counting it. The replay
window is checked before the ICV (a cheap reject) and updated only after it verified.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import CipherContext

from .ciphers import AeadObject
from .counters import EspDrop, SaCounters
from .ip import (
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    IPPROTO_NONE,
    HeaderTemplate,
    fix_transport_checksum,
    flow_of,
)
from .outbound import NEVER
from .params import ChildSaParams
from .replay import ReplayWindow
from .selector import SelectorSet

if TYPE_CHECKING:
    from .sa import ChildSa

_U32 = struct.Struct("!I")
_AAD_ESN = struct.Struct("!III")
_PADDING_AND_LENGTH = tuple(bytes([*range(1, n + 1), n]) for n in range(256))
# the trailer of a tunnel-mode packet carrying IPv4: padding, pad length, next header
_IPV4_TRAILERS = tuple(p + bytes([IPPROTO_IPIP]) for p in _PADDING_AND_LENGTH)
_SPI_SEQ = struct.Struct("!II")
_INNER_HEAD = struct.Struct("!BxH")  # version and header length, total length


class InboundSa:
    """The receiving half of a Child SA. Subclasses hold the cipher."""

    __slots__ = ("_address_only", "_alarm_bytes", "_alarm_packets", "_esn", "_fix_checksums",
                 "_header", "_local", "_local_ip", "_local_ranges", "_min_len", "_params",
                 "_remote", "_remote_ip", "_remote_ranges", "_spi", "child",
                 "counters", "ecn", "replay", "spi", "transport")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes, local: SelectorSet, remote: SelectorSet,
                 min_len: int) -> None:
        self.child = child
        self.counters: SaCounters = child.counters
        self.spi = params.spi_in
        self._spi = int.from_bytes(params.spi_in, "big")
        self._params = params
        self._esn = params.esn
        self.transport = params.mode == "transport"
        # a CE mark on the outer header goes into the packet (RFC 6040 4.2): tunnel mode
        self.ecn = params.copy_ecn and not self.transport
        self._local = local
        self._remote = remote
        self._address_only = local.address_only and remote.address_only
        self._local_ranges = local.ranges
        self._remote_ranges = remote.ranges
        self._local_ip = local_ip
        self._remote_ip = remote_ip
        # transport mode: the header we rebuild says "from the peer to us"
        self._header = HeaderTemplate(remote_ip, local_ip)
        self._fix_checksums = self.transport and params.encap
        self._min_len = min_len
        self.replay = ReplayWindow(params.replay_window, params.esn)
        self._alarm_bytes = NEVER
        self._alarm_packets = NEVER
        self.rearm()

    def decapsulate_untrusted(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decapsulate_run(self, datagrams: list[bytes], at: int,
                        append: Callable[[bytes], object]) -> int:
        """Decapsulate `datagrams[at:]` into `append` while each is an ordinary packet
        of this SA; return the index of the first one left to `decapsulate_untrusted`
        (another SPI, anything dropped or unusual, or the end). The same outcome, counters
        and replay state as `decapsulate_untrusted` one by one, for less work."""
        return at

    # --- shared pieces ---------------------------------------------------------------

    def _deliver(self, plain: bytes) -> bytes:
        """Padding check, next header, inner packet, inbound policy (RFC 4301 5.2)."""
        size = len(plain)
        pad = plain[-2]
        end = size - 2 - pad
        # padding 1, 2, 3, ... then the pad length, checked in place (RFC 4303 2.4)
        if not plain.endswith(_PADDING_AND_LENGTH[pad], 0, size - 1):
            self._drop("pad_errors")
        next_header = plain[-1]
        if self.transport:
            inner = self._transport_packet(plain, end, next_header)
        else:
            if next_header == IPPROTO_IPIP:
                if end < 20 or plain[0] >> 4 != 4:
                    self._drop("malformed_drops")
                total = plain[2] << 8 | plain[3]
                if not 20 <= (plain[0] & 0x0F) * 4 <= total <= end:
                    self._drop("malformed_drops")
                src, dst = plain[12:16], plain[16:20]
            elif next_header == IPPROTO_IPV6:
                if end < 40 or plain[0] >> 4 != 6:
                    self._drop("malformed_drops")
                total = 40 + (plain[4] << 8 | plain[5])
                if total > end:
                    self._drop("malformed_drops")
                src, dst = plain[8:24], plain[24:40]
            elif next_header == IPPROTO_NONE:
                self._drop("dummy_drops")  # RFC 4303 2.6: traffic-flow-confidentiality dummy
            else:
                self._drop("policy_drops")  # a tunnel-mode SA carries IP packets only
            # cut at the inner packet's own length: drops ESP and TFC padding (RFC 4303 2.7)
            inner = plain[:total]
            if self._address_only:
                # inline SelectorSet.covers_address for both sides: the common case
                for start, stop in self._remote_ranges:
                    if start <= src <= stop and len(start) == len(src):
                        break
                else:
                    self._drop("policy_drops")
                for start, stop in self._local_ranges:
                    if start <= dst <= stop and len(start) == len(dst):
                        break
                else:
                    self._drop("policy_drops")
            else:
                self._check_flow(inner)
        counters = self.counters
        counters.packets_in += 1
        counters.bytes_in += len(inner)
        if counters.bytes_in >= self._alarm_bytes or counters.packets_in >= self._alarm_packets:
            self._alarm()
        return inner

    def _transport_packet(self, plain: bytes, end: int, next_header: int) -> bytes:
        """The payload behind a rebuilt header from the peer to us (RFC 4303 3.4.4.1)."""
        if next_header == IPPROTO_NONE:
            self._drop("dummy_drops")
        payload = plain[:end]
        if self._fix_checksums:
            payload = fix_transport_checksum(self._remote_ip, self._local_ip, next_header, payload)
        inner = self._header.build(next_header, len(payload)) + payload
        if not self._address_only:
            # the addresses are the SA's by construction; protocol and ports may be limited
            self._check_flow(inner)
        return inner

    def _check_flow(self, inner: bytes) -> None:
        """Inbound policy on the full flow, for selectors that name protocols or ports."""
        flow = flow_of(inner)
        if flow is None:
            self._drop("malformed_drops")
        version, src, dst, protocol, sport, dport = flow
        if not (self._remote.covers(version, src, protocol, sport)
                and self._local.covers(version, dst, protocol, dport)):
            self._drop("policy_drops")

    def _short(self) -> NoReturn:
        self._drop("expired_drops" if self.child.removed else "malformed_drops")

    def _drop(self, reason: str) -> NoReturn:
        counters = self.counters
        setattr(counters, reason, getattr(counters, reason) + 1)
        raise EspDrop(reason)

    # --- lifetimes -------------------------------------------------------------------

    def close(self) -> None:
        """Refuse everything from now on (the SA left the SAD)."""
        self._min_len = NEVER

    def rearm(self) -> None:
        p = self._params
        bytes_alarm = NEVER if p.hard_bytes is None else p.hard_bytes
        packets_alarm = NEVER if p.hard_packets is None else p.hard_packets
        if not self.child.soft_expired:
            if p.soft_bytes is not None:
                bytes_alarm = min(bytes_alarm, p.soft_bytes)
            if p.soft_packets is not None:
                packets_alarm = min(packets_alarm, p.soft_packets)
        self._alarm_bytes = bytes_alarm
        self._alarm_packets = packets_alarm

    def _alarm(self) -> None:
        p = self._params
        counters = self.counters
        if p.hard_packets is not None and counters.packets_in >= p.hard_packets:
            self.child.hard_expire("packets_in")
        elif p.hard_bytes is not None and counters.bytes_in >= p.hard_bytes:
            self.child.hard_expire("bytes_in")
        elif p.soft_packets is not None and counters.packets_in >= p.soft_packets:
            self.child.soft_expire("packets_in")
        elif p.soft_bytes is not None and counters.bytes_in >= p.soft_bytes:
            self.child.soft_expire("bytes_in")


class AeadInbound(InboundSa):
    """AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634)."""

    __slots__ = ("_aead", "_salt")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes, local: SelectorSet, remote: SelectorSet,
                 aead: AeadObject, salt: bytes) -> None:
        # SPI, sequence number, 8-byte IV, at least pad length and next header, the tag
        super().__init__(child, params, local_ip, remote_ip, local, remote, 8 + 8 + 2 + 16)
        self._aead = aead
        self._salt = salt

    def decapsulate_untrusted(self, data: bytes) -> bytes:
        if len(data) < self._min_len:
            self._short()
        seq_low = _U32.unpack_from(data, 4)[0]
        replay = self.replay
        top = replay.top
        seq = replay.infer(seq_low) if self._esn else seq_low
        if seq <= top and not replay.check(seq):  # above the window: new, no call
            self._drop("replay_drops")
        aad = _AAD_ESN.pack(self._spi, seq >> 32, seq_low) if self._esn else data[:8]
        try:
            # decrypt from a view: no copy of the ciphertext
            plain = self._aead.decrypt(self._salt + data[8:16], memoryview(data)[16:], aad)
        except InvalidTag:
            self._drop("integrity_failures")
        # replay.update(seq), inline for the common case: a new highest number
        shift = seq - top
        if 0 < shift < replay.size:
            replay.bitmap = ((replay.bitmap << shift) | 1) & replay.mask
            replay.top = seq
        else:
            replay.update(seq)
        if self.transport or plain[-1] != IPPROTO_IPIP or not self._address_only:
            return self._deliver(plain)
        # the hot path, `_deliver` inline: tunnel mode, IPv4 inside, addresses only
        size = len(plain)
        pad = plain[-2]
        end = size - 2 - pad
        if not plain.endswith(_PADDING_AND_LENGTH[pad], 0, size - 1):
            self._drop("pad_errors")
        if end < 20 or plain[0] >> 4 != 4:
            self._drop("malformed_drops")
        total = plain[2] << 8 | plain[3]
        if not 20 <= (plain[0] & 0x0F) * 4 <= total <= end:
            self._drop("malformed_drops")
        src = plain[12:16]
        for start, stop in self._remote_ranges:
            if start <= src <= stop and len(start) == 4:
                break
        else:
            self._drop("policy_drops")
        dst = plain[16:20]
        for start, stop in self._local_ranges:
            if start <= dst <= stop and len(start) == 4:
                break
        else:
            self._drop("policy_drops")
        # cut at the inner packet's own length: drops ESP and TFC padding (RFC 4303 2.7)
        inner = plain[:total]
        counters = self.counters
        counters.packets_in += 1
        bytes_in = counters.bytes_in = counters.bytes_in + total
        if bytes_in >= self._alarm_bytes or counters.packets_in >= self._alarm_packets:
            self._alarm()
        return inner

    def decapsulate_run(self, datagrams: list[bytes], at: int,
                        append: Callable[[bytes], object]) -> int:
        # the bulk case only: tunnel mode, IPv4 inside without options, address
        # selectors, no ESN, every packet new and in order; anything else (drops
        # included) goes back to the caller, which decapsulates that one with
        # `decapsulate_untrusted` and counts it
        if self._esn or self.transport or not self._address_only:
            return at
        spi = self._spi
        min_len = self._min_len
        decrypt = self._aead.decrypt
        salt = self._salt
        replay = self.replay
        window = replay.size
        mask = replay.mask
        counters = self.counters
        unpack = _SPI_SEQ.unpack_from
        inner_head = _INNER_HEAD.unpack_from
        checked = b""  # the last inner addresses that passed the selectors
        # the window and the counters live in locals until the run ends
        top, bitmap = replay.top, replay.bitmap
        bytes_in = counters.bytes_in
        alarm_bytes = self._alarm_bytes
        # no further than the packet that reaches the packet limit (its alarm is due)
        n = min(len(datagrams), at + max(0, self._alarm_packets - counters.packets_in))
        i = at
        try:
            while i < n:
                data = datagrams[i]
                if len(data) < min_len:
                    break
                packet_spi, seq = unpack(data)
                shift = seq - top
                if packet_spi != spi or not 0 < shift < window:  # another SA, a replay check
                    break  # that could fail, or a jump
                try:
                    plain = decrypt(salt + data[8:16], data[16:], data[:8])
                except InvalidTag:
                    break
                # the slow path must see the same state for a packet that fails from
                # here on: check everything before recording the sequence number.
                # Padding, pad length and next header 4 (IPv4) in one comparison.
                pad = plain[-2]
                first, total = inner_head(plain)
                if not plain.endswith(_IPV4_TRAILERS[pad]) or first != 0x45 \
                        or not 20 <= total <= len(plain) - 2 - pad:
                    break
                addresses = plain[12:20]
                if addresses != checked:
                    src, dst = addresses[:4], addresses[4:]
                    if not any(start <= src <= stop and len(start) == 4
                               for start, stop in self._remote_ranges) \
                            or not any(start <= dst <= stop and len(start) == 4
                                       for start, stop in self._local_ranges):
                        break
                    checked = addresses
                bitmap = ((bitmap << shift) | 1) & mask
                top = seq
                append(plain[:total])
                i += 1
                bytes_in += total
                if bytes_in >= alarm_bytes:
                    break
        finally:
            replay.top, replay.bitmap = top, bitmap
            counters.packets_in += i - at
            counters.bytes_in = bytes_in
        if bytes_in >= alarm_bytes or counters.packets_in >= self._alarm_packets:
            self._alarm()  # may remove the SA: the caller looks the next one up
        return i


class CbcInbound(InboundSa):
    """AES-CBC (RFC 3602) or 3DES-CBC with HMAC (RFC 4868, RFC 2404): encrypt-then-MAC."""

    __slots__ = ("_block", "_decryptor", "_hmac", "_icv_size")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes, local: SelectorSet, remote: SelectorSet,
                 decryptor: CipherContext, mac: hmac.HMAC, icv_size: int) -> None:
        block = params.encr.block_size
        # SPI, sequence number, IV, one block, the ICV
        super().__init__(child, params, local_ip, remote_ip, local, remote,
                         8 + 2 * block + icv_size)
        self._block = block
        self._decryptor = decryptor
        self._hmac = mac
        self._icv_size = icv_size

    def decapsulate_untrusted(self, data: bytes) -> bytes:
        length = len(data)
        icv_at = length - self._icv_size
        if length < self._min_len or (icv_at - 8) % self._block:
            self._short()
        seq_low = _U32.unpack_from(data, 4)[0]
        replay = self.replay
        seq = replay.infer(seq_low) if self._esn else seq_low
        if seq <= replay.top and not replay.check(seq):  # above the window: new, no call
            self._drop("replay_drops")
        mac = self._hmac.copy()
        mac.update(data[:icv_at])
        if self._esn:
            mac.update(_U32.pack(seq >> 32))  # RFC 4303 3.3.2.1
        if not hmac.compare_digest(mac.digest()[: self._icv_size], data[icv_at:]):
            self._drop("integrity_failures")
        replay.update(seq)
        # feed IV | ciphertext; the first block decrypts to garbage (see ciphers.py)
        plain = self._decryptor.update(data[8:icv_at])[self._block :]
        return self._deliver(plain)
