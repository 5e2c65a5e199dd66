/* A DTLS 1.2 client built on wolfSSL (an implementation nobody here wrote) with RFC 9146
 * Connection ID, driven line by line by connectord's tests (tests/it/dtls.rs).
 *
 *   wolfssl-cid-client HOST PORT IDENTITY KEY_HEX
 *
 * Does a PSK handshake (TLS_PSK_WITH_AES_128_CCM_8) offering an empty CID of its own
 * (it uses the server's), prints `connected cid=<server's CID, hex> port=<local port>`,
 * then reads commands on stdin:
 *   send HEX     one record with these bytes as application data; prints `sent`
 *   recv MS      the next application data within MS ms: `data HEX` or `timeout`
 *   rebind       a new UDP socket on a new local port (the same DTLS session, as after a
 *                NAT rebinding); prints `rebound port=<local port>`
 *   quit
 * Errors go to stderr with a non-zero exit. With WOLFSSL_CLIENT_DEBUG set (and wolfSSL built
 * with DEBUG_WOLFSSL), wolfSSL logs to stderr. */
#include <wolfssl/wolfcrypt/settings.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static char identity[128];
static unsigned char key[64];
static unsigned int key_len;

static unsigned int psk_cb(WOLFSSL *ssl, const char *hint, char *id, unsigned int id_max,
                           unsigned char *k, unsigned int k_max) {
    (void)ssl;
    (void)hint;
    if (strlen(identity) + 1 > id_max || key_len > k_max)
        return 0;
    strcpy(id, identity);
    memcpy(k, key, key_len);
    return key_len;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int unhex(const char *s, unsigned char *out, unsigned int max) {
    unsigned int n = 0;
    while (s[0] && s[0] != '\n' && s[1]) {
        int h = hexval(s[0]), l = hexval(s[1]);
        if (h < 0 || l < 0 || n >= max) return -1;
        out[n++] = (unsigned char)(h * 16 + l);
        s += 2;
    }
    return (int)n;
}

static void die(const char *what, WOLFSSL *ssl, int ret) {
    char buf[128] = "";
    if (ssl) wolfSSL_ERR_error_string((unsigned long)wolfSSL_get_error(ssl, ret), buf);
    fprintf(stderr, "%s failed: %d %s (errno %d)\n", what, ret, buf, errno);
    exit(1);
}

static int new_socket(int *port) {
    struct sockaddr_in local;
    socklen_t len = sizeof local;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket", NULL, fd);
    memset(&local, 0, sizeof local);
    local.sin_family = AF_INET;
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0) die("bind", NULL, -1);
    if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) die("getsockname", NULL, -1);
    *port = ntohs(local.sin_port);
    return fd;
}

static void set_timeout(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

int main(int argc, char **argv) {
    struct sockaddr_in server;
    int fd, port, ret;
    unsigned char buf[4096];
    char line[8192];
    WOLFSSL_CTX *ctx;
    WOLFSSL *ssl;

    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT IDENTITY KEY_HEX\n", argv[0]);
        return 2;
    }
    snprintf(identity, sizeof identity, "%s", argv[3]);
    ret = unhex(argv[4], key, sizeof key);
    if (ret <= 0) die("key", NULL, ret);
    key_len = (unsigned int)ret;
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) die("address", NULL, 0);

    setvbuf(stdout, NULL, _IOLBF, 0);
    wolfSSL_Init();
    if (getenv("WOLFSSL_CLIENT_DEBUG")) wolfSSL_Debugging_ON();
    ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
    if (!ctx) die("CTX_new", NULL, 0);
    if (wolfSSL_CTX_set_cipher_list(ctx, "PSK-AES128-CCM-8") != WOLFSSL_SUCCESS)
        die("set_cipher_list", NULL, 0);
    wolfSSL_CTX_set_psk_client_callback(ctx, psk_cb);
    ssl = wolfSSL_new(ctx);
    if (!ssl) die("wolfSSL_new", NULL, 0);
    if ((ret = wolfSSL_dtls_cid_use(ssl)) != WOLFSSL_SUCCESS) die("dtls_cid_use", ssl, ret);
    fd = new_socket(&port);
    set_timeout(fd, 10000);
    wolfSSL_set_fd(ssl, fd);
    wolfSSL_dtls_set_peer(ssl, &server, sizeof server);
    if ((ret = wolfSSL_connect(ssl)) != WOLFSSL_SUCCESS) die("connect", ssl, ret);
    {
        unsigned char *cid = NULL;
        unsigned int i, size = 0;
        if (wolfSSL_dtls_cid_get0_tx(ssl, &cid) != WOLFSSL_SUCCESS || cid == NULL ||
            wolfSSL_dtls_cid_get_tx_size(ssl, &size) != WOLFSSL_SUCCESS)
            size = 0;
        printf("connected cid=");
        for (i = 0; i < size; i++) printf("%02x", cid[i]);
        printf(" port=%d\n", port);
    }

    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "send ", 5) == 0) {
            int n = unhex(line + 5, buf, sizeof buf);
            if (n <= 0) die("send: hex", NULL, n);
            if ((ret = wolfSSL_write(ssl, buf, n)) != n) die("write", ssl, ret);
            printf("sent\n");
        } else if (strncmp(line, "recv ", 5) == 0) {
            int i;
            set_timeout(fd, atoi(line + 5));
            ret = wolfSSL_read(ssl, buf, sizeof buf);
            if (ret > 0) {
                printf("data ");
                for (i = 0; i < ret; i++) printf("%02x", buf[i]);
                printf("\n");
            } else {
                int err = wolfSSL_get_error(ssl, ret);
                if (err == WOLFSSL_ERROR_WANT_READ || err == SOCKET_ERROR_E ||
                    err == WOLFSSL_ERROR_ZERO_RETURN || errno == EAGAIN)
                    printf("timeout %d\n", err);
                else
                    die("read", ssl, ret);
            }
        } else if (strncmp(line, "rebind", 6) == 0) {
            int old = fd;
            fd = new_socket(&port);
            wolfSSL_set_fd(ssl, fd);
            wolfSSL_dtls_set_peer(ssl, &server, sizeof server);
            close(old);
            printf("rebound port=%d\n", port);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            fprintf(stderr, "unknown command: %s", line);
            return 2;
        }
    }
    wolfSSL_shutdown(ssl);
    wolfSSL_free(ssl);
    wolfSSL_CTX_free(ctx);
    wolfSSL_Cleanup();
    return 0;
}
