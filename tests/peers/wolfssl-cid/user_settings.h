/* wolfSSL build for tests/peers/wolfssl-cid/client.c: DTLS 1.2 client with RFC 9146
 * Connection ID and TLS_PSK_WITH_AES_128_CCM_8 (connectord's PSK suite). Test-only. */
#ifndef CONNECTORD_WOLFSSL_USER_SETTINGS_H
#define CONNECTORD_WOLFSSL_USER_SETTINGS_H
#define WOLFSSL_DTLS
#define WOLFSSL_DTLS_CID
#define HAVE_TLS_EXTENSIONS
#define HAVE_SUPPORTED_CURVES
#define HAVE_EXTENDED_MASTER
#define WOLFSSL_STATIC_PSK
#define HAVE_AESCCM
#define HAVE_AESGCM
#define HAVE_ECC
#define ECC_TIMING_RESISTANT
#define TFM_TIMING_RESISTANT
#define WC_RSA_BLINDING
#define NO_OLD_TLS
#define WOLFSSL_NO_TLS13_STUB
#define NO_DSA
#define NO_RC4
#define NO_MD4
#define NO_DES3
#define WOLFSSL_SP_MATH_ALL
#define HAVE_HASHDRBG
#endif
