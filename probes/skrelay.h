/* Definitions shared by the kernel programs and the Rust side (relay/abi.rs mirrors them; the
 * abi test compiles this header on the host and checks that sizes, offsets and values agree). */
#pragma once
#include <linux/types.h>

/* Per-CPU counters of the relay programs (index into the `relay_stats` PERCPU_ARRAY). */
enum relay_stat {
	RELAY_STAT_VERDICTS = 0,  /* skbs seen by the verdict program */
	RELAY_STAT_REDIRECTED = 1,/* skbs redirected to the peer's egress */
	RELAY_STAT_NO_PEER = 2,   /* skbs of a socket without a peer entry: passed to its own queue */
	RELAY_STAT_DROPPED = 3,   /* redirects the kernel refused (peer gone from the map) */
	RELAY_STAT_BYTES = 4,     /* payload bytes redirected */
	RELAY_STAT_MAX = 5,
};

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
	ACCEL_STAT_RACES_LOST = 8,   /* connections left out: the connecting end sent before its peer joined */
	ACCEL_STAT_MAX = 9,
};

/* The `accel_config` ARRAY's single value. */
struct accel_config {
	__u32 filter_ports; /* 0: every connection; 1: only those with an end on a port in `accel_ports` */
};
