/* Definitions shared by the kernel programs and the Rust side (relay/abi.rs mirrors them; the
 * abi test compiles this header on the host and checks that sizes, offsets and values agree). */
#pragma once
#include <linux/types.h>

/* ---- limits: the single source of every map size user space also needs to know ---- */

/* max_entries of every map with one entry per socket: the relay's `socks`, `targets` and `peers`
 * (a pair takes 2 of each), accel's `accel_socks`, `accel_members` and `accel_listeners`. */
#define MAX_SOCKETS 65536
/* max_entries of accel's `accel_ports` (`accel on --ports`). */
#define ACCEL_MAX_PORTS 1024

/* Per-CPU counters of the relay programs (index into the `relay_stats` PERCPU_ARRAY). */
enum relay_stat {
	RELAY_STAT_VERDICTS = 0,  /* skbs seen by the verdict program */
	RELAY_STAT_REDIRECTED = 1,/* skbs redirected to the peer's egress */
	RELAY_STAT_NO_PEER = 2,   /* skbs of a socket without a peer entry: passed to its own queue */
	RELAY_STAT_DROPPED = 3,   /* redirects the kernel refused (peer gone from the map) */
	RELAY_STAT_BYTES = 4,     /* payload bytes redirected */
	RELAY_STAT_EVENTS_LOST = 5,/* budget events the ring buffer had no room for */
	RELAY_STAT_PARKED = 6,    /* payload bytes parked at a budget for user space */
	RELAY_STAT_TRIMMED = 7,   /* bytes cut from the head of skbs that repeated bytes already
	                           * handed on (a retransmission overlapping received data) */
	RELAY_STAT_BROKEN = 8,    /* skbs that could not be trimmed: the pair is reset */
	RELAY_STAT_EXTENDED = 9,  /* skbs redirected past user space's budget because the verdict
	                           * measured the peer itself and found room (within_limit) */
	RELAY_STAT_MAX = 10,
};

/* Value of the relay `peers` HASH, by socket cookie; written by user space only. */
struct relay_peer {
	__u64 peer;   /* the peer's socket cookie: where this socket's bytes are redirected */
	__u64 budget; /* the verdict redirects while `redirected` stays within this count; past
	               * it, it parks the socket's bytes in the socket's own queue, where TCP's
	               * receive window holds the sender back until user space takes them */
	__u64 notify; /* the verdict tells user space (`relay_events`) when `redirected` passes
	               * this, so that it moves the budget on before the bytes must park */
	__u64 taken;  /* parked bytes user space has taken out of the socket's queue: while
	               * `parked` differs, the verdict parks every skb, so none overtakes them */
	__u64 hold;   /* the verdict tells user space when the bytes parked and not yet taken
	               * pass this many: parked skbs that wait behind the psock's backlog are not
	               * charged to the receive buffer, so the window may not close by itself */
	__u64 base;   /* what had entered the peer's send queue when the pair joined
	               * (bytes_acked + SIOCOUTQ, as user space measures it) */
	__u64 limit;  /* --kernel-buffer: once `budget` is used up, the verdict measures the peer
	               * itself and redirects while what waits between the sockets stays within
	               * this (0: it parks at `budget`, as before) */
};

/* Value of the relay `relay_counts` HASH, by socket cookie; written by the verdict only. */
struct relay_count {
	__u64 redirected; /* payload bytes redirected to the peer */
	__u64 parked;     /* payload bytes kept in the socket's own queue for user space */
	__u32 next_seq;   /* TCP sequence number of the next byte the verdict has not handed on */
	__u32 flags;      /* RELAY_COUNT_SEQ_KNOWN, RELAY_COUNT_BROKEN */
};
/* `relay_count.flags` */
#define RELAY_COUNT_SEQ_KNOWN 1 /* next_seq is set (from copied_seq at the first verdict) */
#define RELAY_COUNT_BROKEN 2    /* a repeated head could not be cut off: user space resets */

/* Five-tuple key of a socket in the accel SOCKHASH; ports in host byte order, addresses as the
 * kernel gives them (network order), IPv4 as IPv4-mapped IPv6 so both families share one key. */
struct sock_key {
	__u32 local_ip6[4];
	__u32 remote_ip6[4];
	__u32 local_port;
	__u32 remote_port;
};

/* Per-CPU counters of the accel programs (index into the `accel_stats` PERCPU_ARRAY). */
enum accel_stat {
	ACCEL_STAT_SOCKETS = 0,      /* sockets that joined the SOCKHASH when established */
	ACCEL_STAT_CONNECTIONS = 1,  /* connections whose both ends joined (counted when the accepted end joins) */
	ACCEL_STAT_MESSAGES = 2,     /* sendmsg calls redirected into the peer's receive queue */
	ACCEL_STAT_BYTES = 3,        /* bytes redirected */
	ACCEL_STAT_FALLBACKS = 4,    /* sendmsg calls of a member socket whose peer is not in the map */
	ACCEL_STAT_INSERT_BUSY = 5,  /* inserts refused with EBUSY: another sk_msg program holds the socket */
	ACCEL_STAT_INSERT_FAILED = 6,/* inserts refused for any other reason */
	ACCEL_STAT_LAST_ERRNO = 7,   /* errno of the latest refused insert (a value, not a count) */
	ACCEL_STAT_RACES_LOST = 8,   /* connections left out: bytes took TCP before both ends joined (early send, TCP Fast Open), or
	                        * a socket option the redirect skips (SO_ZEROCOPY, timestamps, ...) */
	ACCEL_STAT_PAUSES = 9,       /* directions moved to the TCP path: the reader held its limit unread */
	ACCEL_STAT_RESUMES = 10,     /* directions moved back to the redirect once that kept byte order */
	ACCEL_STAT_DEMOTED_SMALL = 11,/* directions moved to the TCP path for good: small writes streamed at a busy reader */
	ACCEL_STAT_PASSED = 12,      /* sendmsg calls of paused or demoted directions (TCP path) */
	ACCEL_STAT_PASSED_BYTES = 13,/* their bytes */
	ACCEL_STAT_LEFT = 14,        /* sockets that left the map because their sends took the TCP path */
	ACCEL_STAT_STUCK = 15,       /* paused directions that gave up resuming (TCP-path sends outran redirected ones by 32x max_queued, 2x when crowded) */
	ACCEL_STAT_LIVE_SOCKETS = 16,/* a gauge, not a count: sockets in `accel_members` now (joined and not closed), summed over CPUs */
	ACCEL_STAT_MAX = 17,
};

/* accel_config.flags. A set-up whose program knows DRAINING says so with KNOWS_DRAINING (one
 * pinned by a version before it has 0 there): `off` then sets DRAINING, and no new connection
 * joins while sockops stays attached for the joined ones (their FIN, RTT and close callbacks);
 * otherwise `off` detaches sockops at once. */
#define ACCEL_FLAG_KNOWS_DRAINING 1
#define ACCEL_FLAG_DRAINING 2

/* The `accel_config` ARRAY's single value. */
struct accel_config {
	__u32 filter_ports; /* 0: every connection; 1: only those with an end on a port in `accel_ports` */
	__u32 max_queued;   /* the most bytes a reader may hold unread in its redirect queue; above it
	                     * the peer's sends take the TCP path, where flow control holds the sender
	                     * back, until the queue drains */
	__u32 small_write;  /* a sendmsg below this many bytes is small (0: never demote for size) */
	__u32 small_streak; /* demote after this many consecutive small sends at a reader with unread data */
	__u32 cpus;         /* CPUs the cgroup's processes may run on (0: 1); more live connections than this
	                     * is crowded, and a paused direction gives up sooner (STUCK_LIMITS_CROWDED) */
	__u32 flags;        /* ACCEL_FLAG_*: `on` sets KNOWS_DRAINING, `off` sets DRAINING */
	__u64 woken_wake_function; /* the kernel's address of woken_wake_function (/proc/kallsyms; 0:
	                            * unknown): the wake function of a thread blocked in recvmsg */
};

/* ---- steer: sk_lookup funnels (probes/steer.bpf.c, relay/steer/) ---- */

#define STEER_MAX_BINDINGS 4096
#define STEER_MAX_PORT_ENTRIES 262144

/* Key of the `steer_ports` LPM trie: one entry per (family, proto, port, address prefix). The
 * first 32 bits (family, proto, port) are always part of the prefix, so `prefixlen` is 32 plus
 * the address prefix length; the longest address prefix therefore wins. `port` is host order,
 * `addr` network order (IPv4 in the first 4 bytes). */
struct steer_key {
	__u32 prefixlen;
	__u8 family;  /* AF_INET or AF_INET6 */
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u16 port;
	__u32 addr[4];
};

/* What a binding is and where it sends connections (`steer_bindings`, by binding id). Written by
 * user space only; the program reads nothing here (it is for `steer list` and bpftool). */
struct steer_binding {
	__u64 cookie;        /* SO_COOKIE of the target socket when it was bound */
	__u32 pid;           /* the process the target was taken from */
	__u16 port_lo;       /* inclusive port range, host order */
	__u16 port_hi;
	__u8 family;         /* of the prefix */
	__u8 proto;
	__u8 prefixlen;      /* of the address prefix (0..32 or 0..128) */
	__u8 target_family;
	__u16 target_port;   /* the target's local address, host order */
	__u16 target_scope;  /* interface index of a link-local IPv6 target (0: none, or above 65535) */
	__u8 addr[16];       /* the prefix, network order */
	__u8 target_addr[16];
	char comm[16];       /* the target process's name */
};

/* Per-CPU counters of one binding (`steer_stats`, by binding id). */
struct steer_counters {
	__u64 hits;    /* connections (or datagrams) handed to the target */
	__u64 refused; /* refused because the target socket is gone or refused the assignment */
};
