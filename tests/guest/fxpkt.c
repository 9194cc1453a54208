/* fxpkt: raw Ethernet frames (ethertype 0x88B5) inside the test guest.
 *
 * Built by tests/guestos.py with the host's `gcc -static` and put into the
 * guest's initramfs. busybox has nothing that sends or counts raw frames.
 *
 *   fxpkt serve IFACE FILE        count every 0x88B5 frame IFACE receives, by
 *                                 marker (payload up to the first NUL/space,
 *                                 at most 31 bytes) and packet type (host,
 *                                 broadcast, multicast, otherhost); rewrite
 *                                 FILE after each frame as "MARKER TYPE N"
 *                                 lines. A frame for us whose payload starts
 *                                 with "PING" is answered to its source with
 *                                 "PONG" + the rest, from IFACE's current MAC.
 *   fxpkt send IFACE DST N MARKER send N frames to DST, source IFACE's MAC now
 *   fxpkt now                     print CLOCK_REALTIME as SECONDS.NANOSECONDS
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETHERTYPE 0x88B5
#define MAXMARK 64

struct counter { char marker[32]; int type; unsigned long n; };
static struct counter table[MAXMARK];
static int used;
static const char *types[] = {"host", "broadcast", "multicast", "otherhost", "outgoing"};

static int open_sock(const char *ifname, int *ifindex)
{
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETHERTYPE));
    if (fd < 0) { perror("socket"); exit(1); }
    *ifindex = if_nametoindex(ifname);
    if (!*ifindex) { perror(ifname); exit(1); }
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETHERTYPE);
    sll.sll_ifindex = *ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); exit(1); }
    return fd;
}

static void own_mac(int fd, const char *ifname, unsigned char *mac)
{
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) { perror("SIOCGIFHWADDR"); exit(1); }
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
}

static int parse_mac(const char *s, unsigned char *mac)
{
    unsigned int b[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = b[i];
    return 0;
}

static void send_frame(int fd, int ifindex, const unsigned char *dst, const unsigned char *src,
                       const unsigned char *payload, size_t len)
{
    unsigned char frame[1514] = {0};
    memcpy(frame, dst, 6);
    memcpy(frame + 6, src, 6);
    frame[12] = ETHERTYPE >> 8;
    frame[13] = ETHERTYPE & 0xff;
    if (len > sizeof frame - 14) len = sizeof frame - 14;
    memcpy(frame + 14, payload, len);
    size_t total = 14 + len < 60 ? 60 : 14 + len;
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, dst, 6);
    if (sendto(fd, frame, total, 0, (struct sockaddr *)&sll, sizeof sll) < 0) perror("sendto");
}

static void dump(const char *path)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    for (int i = 0; i < used; i++)
        fprintf(f, "%s %s %lu\n", table[i].marker, types[table[i].type], table[i].n);
    fclose(f);
    rename(tmp, path);
}

static int serve(const char *ifname, const char *path)
{
    int ifindex;
    int fd = open_sock(ifname, &ifindex);
    unsigned char buf[2048];
    dump(path);
    for (;;) {
        struct sockaddr_ll from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
        if (n < 14) continue;
        int type = from.sll_pkttype;
        if (type == PACKET_OUTGOING || type > 4) continue;
        char marker[32] = {0};
        for (int i = 0; i < 31 && 14 + i < n; i++) {
            unsigned char c = buf[14 + i];
            if (c <= ' ' || c > '~') break;
            marker[i] = c;
        }
        if (!marker[0]) strcpy(marker, "-");
        int k;
        for (k = 0; k < used; k++)
            if (table[k].type == type && !strcmp(table[k].marker, marker)) break;
        if (k == used && used < MAXMARK) {
            strcpy(table[used].marker, marker);
            table[used].type = type;
            used++;
        }
        if (k < MAXMARK) table[k].n++;
        dump(path);
        if (type == PACKET_HOST && n >= 18 && !memcmp(buf + 14, "PING", 4)) {
            unsigned char src[6];
            own_mac(fd, ifname, src);
            memcpy(buf + 14, "PONG", 4);
            send_frame(fd, ifindex, buf + 6, src, buf + 14, n - 14);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "now")) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        printf("%lld.%09ld\n", (long long)ts.tv_sec, ts.tv_nsec);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "serve")) return serve(argv[2], argv[3]);
    if (argc == 6 && !strcmp(argv[1], "send")) {
        int ifindex;
        int fd = open_sock(argv[2], &ifindex);
        unsigned char dst[6], src[6];
        if (parse_mac(argv[3], dst) < 0) { fprintf(stderr, "bad MAC %s\n", argv[3]); return 2; }
        own_mac(fd, argv[2], src);
        int count = atoi(argv[4]);
        for (int i = 0; i < count; i++)
            send_frame(fd, ifindex, dst, src, (const unsigned char *)argv[5], strlen(argv[5]) + 1);
        return 0;
    }
    fprintf(stderr, "usage: fxpkt serve IFACE FILE | send IFACE DST N MARKER | now\n");
    return 2;
}
