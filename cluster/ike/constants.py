"""IANA numbers for IKEv2 (RFC 7296 section 3 and the IKEv2 registries)."""

from __future__ import annotations

from enum import IntEnum

IKE_PORT = 500
NATT_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
HEADER_SIZE = 28
IKEV2_VERSION = 0x20


class ExchangeType(IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class Flag(IntEnum):
    RESPONSE = 0x20
    VERSION = 0x10
    INITIATOR = 0x08


class PayloadType(IntEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class ProtocolId(IntEnum):
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class TransformAttribute(IntEnum):
    KEY_LENGTH = 14


class IdType(IntEnum):
    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    DER_ASN1_GN = 10
    KEY_ID = 11


class AuthMethod(IntEnum):
    RSA_SIG = 1
    PSK = 2
    DSS_SIG = 3
    ECDSA_SHA256_P256 = 9
    ECDSA_SHA384_P384 = 10
    ECDSA_SHA512_P521 = 11
    DIGITAL_SIGNATURE = 14  # RFC 7427


class CertEncoding(IntEnum):
    X509_SIGNATURE = 4


class TsType(IntEnum):
    IPV4_ADDR_RANGE = 7
    IPV6_ADDR_RANGE = 8


class CfgType(IntEnum):
    """Configuration payload types (RFC 7296 3.15)."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class ConfigAttribute(IntEnum):
    """Configuration attribute types (RFC 7296 3.15.1)."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15


class HashAlgorithm(IntEnum):
    """RFC 7427 section 7 hash algorithm identifiers."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5


class NotifyType(IntEnum):
    # errors (< 16384)
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # status (>= 16384)
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    MULTIPLE_AUTH_SUPPORTED = 16404
    EAP_ONLY_AUTHENTICATION = 16417
    IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420
    IKEV2_MESSAGE_ID_SYNC = 16422
    IKEV2_FRAGMENTATION_SUPPORTED = 16430
    SIGNATURE_HASH_ALGORITHMS = 16431
