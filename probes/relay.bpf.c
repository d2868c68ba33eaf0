// SPDX-License-Identifier: GPL-2.0
/* relay: splice the two sockets of a pair inside the kernel.
 *
 * `socks` carries the verdict (no stream parser: with one, a socket whose bytes park deadlocks;
 * KERNEL-NOTES.md): every skb that arrives on a member socket is
 * redirected to the egress of its peer. The peer is looked up by socket cookie in `peers`, and
 * the redirect goes through `targets`, a SOCKHASH without programs. User space fills `targets`
 * and `peers` for both sockets of a pair BEFORE either joins `socks`, so a verdict never runs
 * while its peer is unreachable (bpf_sk_redirect_hash drops the skb in that case).
 *
 * A redirect never blocks and the kernel does not bound what waits on the peer's psock
 * (net/core/skmsg.c queues it without a check), so each socket has a budget (`peers`): the
 * verdict redirects while its count of redirected bytes (`relay_counts`) stays within it, and
 * past it parks the skb (SK_PASS: the socket's own queue, charged to its receive buffer, so TCP's
 * window holds the sender back). User space hears of it on `relay_events`, moves the parked bytes
 * once the peer's client has drained, and moves the budget on. A socket never leaves `socks`
 * while its pair lives: taking the programs away from a socket that is receiving drops skbs
 * (sk_psock_verdict_recv defaults to __SK_DROP when it finds no verdict program). See
 * relay/datapath/budget.rs. Verdict-only mode hands the verdict whole skbs from the receive queue,
 * including bytes it already handed on (a retransmission's overlap, a partly read skb): see
 * cut_repeated_head. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "skrelay.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);   /* socket cookie */
	__type(value, __u32); /* socket fd on update */
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);   /* cookie */
	__type(value, struct relay_peer);
	/* User space replaces entries while verdicts read them: without preallocation a replaced
	 * element is freed after an RCU grace period, so a verdict never reads a recycled one (a
	 * preallocated element can be reused at once, by another socket's entry). */
	__uint(map_flags, BPF_F_NO_PREALLOC);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64); /* cookie */
	__type(value, struct relay_count);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} relay_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18); /* 16,384 events of 16 bytes */
} relay_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RELAY_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} relay_stats SEC(".maps");

/* Just enough of the kernel's types to read a skb's TCP sequence number and a socket's
 * copied_seq; preserve_access_index makes clang emit CO-RE relocations, resolved against the
 * running kernel's BTF at load. */
struct sk_buff___relay {
	char cb[48];
} __attribute__((preserve_access_index));
struct tcp_sock {
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&relay_stats, &idx);
	if (v)
		*v += n; /* per-CPU slot: no atomics needed */
}

/* Tells user space to look at this socket's budget. */
static __always_inline void report(__u64 cookie)
{
	if (bpf_ringbuf_output(&relay_events, &cookie, sizeof(cookie), 0))
		count(RELAY_STAT_EVENTS_LOST, 1);
}

/* Cuts from the head of `skb` the bytes the verdict already handed on.
 *
 * In verdict-only mode the kernel hands the verdict whole skbs from the receive queue
 * (tcp_read_skb), but TCP queues a retransmitted segment that overlaps bytes it already has
 * without trimming it (tcp_data_queue's "partial packet": tcp_recvmsg skips the overlap by
 * copied_seq, tcp_read_skb does not). Seen on loopback about once per ten 1 GiB transfers while a
 * direction was parked (zero windows, retransmissions): the receiver got 65,483 bytes twice. The
 * same holds for an skb user space had partly read before the pair joined. So each socket
 * remembers the sequence number of the next byte it has not handed on; the first verdict takes it
 * from copied_seq (what user space consumed). Returns the bytes cut, or -1 when they could not
 * be cut (the skb is then dropped and the pair marked for a reset). */
#define CUT_CALLS_MAX 512

static __always_inline long cut_repeated_head(struct __sk_buff *skb, struct relay_count *c)
{
	__u32 seq = 0;
	/* tcp_skb_cb.seq is the first field of skb->cb. */
	if (bpf_probe_read_kernel(&seq, sizeof(seq),
				  (void *)skb + __builtin_preserve_field_info(((struct sk_buff___relay *)0)->cb,
									      0 /* byte offset */)))
		goto broken;
	if (!(c->flags & RELAY_COUNT_SEQ_KNOWN)) {
		struct bpf_sock *sk = skb->sk;
		if (!sk)
			goto broken;
		struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
		if (!tp)
			goto broken;
		c->next_seq = tp->copied_seq;
		c->flags |= RELAY_COUNT_SEQ_KNOWN;
	}
	__u32 len = skb->len;
	__s32 overlap = (__s32)(c->next_seq - seq);
	__u32 end = seq + len;
	if ((__s32)(end - c->next_seq) > 0)
		c->next_seq = end;
	if (overlap <= 0)
		return 0;
	if ((__u32)overlap >= len) {
		count(RELAY_STAT_TRIMMED, len);
		return len;
	}
	__s32 left = overlap;
	/* bpf_skb_adjust_room cuts at most 4095 bytes a call (sk_skb_adjust_room). TCP coalesces
	 * queued segments into skbs of up to MAX_SKB_FRAGS pages of 64 KiB, and splice(2) before a
	 * join can leave most of one read: up to CUT_CALLS_MAX x 4095 bytes (2 MiB) are cut. */
	for (int i = 0; i < CUT_CALLS_MAX && left > 0; i++) {
		__s32 n = left > 4095 ? 4095 : left;
		if (bpf_skb_adjust_room(skb, -n, 0, 0))
			goto broken;
		left -= n;
	}
	if (left > 0)
		goto broken;
	count(RELAY_STAT_TRIMMED, overlap);
	return overlap;
broken:
	c->flags |= RELAY_COUNT_BROKEN;
	count(RELAY_STAT_BROKEN, 1);
	report(bpf_get_socket_cookie(skb));
	return -1;
}

/* The budget user space granted is used up: whether the peer has taken enough meanwhile that
 * `len` more bytes still keep what waits between the sockets within `limit`. User space grants
 * the next budget when the verdict passes `notify`, but on a busy machine its answer often came
 * after the budget was used up, and the direction parked with little in flight (measured: 4 of
 * 10 parkings in a 1 GiB transfer found 0-11 MiB of a 16 MiB budget in flight), and a parking
 * stops the sender until user space has caught up. So the verdict measures the peer as user
 * space does: what entered its send queue (bytes_acked + write_seq - snd_una) against what
 * this direction redirected and user space wrote on since `base`. */
static __always_inline int within_limit(const struct relay_peer *peer, const struct relay_count *c, __u32 len)
{
	if (!peer->limit)
		return 0;
	__u64 peer_cookie = peer->peer;
	struct bpf_sock *psk = bpf_map_lookup_elem(&targets, &peer_cookie);
	if (!psk)
		return 0;
	int ok = 0;
	struct tcp_sock *ptp = bpf_skc_to_tcp_sock(psk);
	if (ptp) {
		__u64 entered = ptp->bytes_acked + (__u32)(ptp->write_seq - ptp->snd_una);
		__u64 left = peer->base + c->redirected + peer->taken;
		__u64 in_flight = left > entered ? left - entered : 0;
		ok = in_flight + len <= peer->limit;
	}
	bpf_sk_release(psk);
	if (ok)
		count(RELAY_STAT_EXTENDED, 1);
	return ok;
}

SEC("sk_skb/stream_verdict")
int relay_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct relay_peer *peer = bpf_map_lookup_elem(&peers, &cookie);
	__u32 len = skb->len;

	count(RELAY_STAT_VERDICTS, 1);
	/* Verdict-only mode hands over the FIN's empty skb too; sent on to the peer it would make
	 * the psock backlog's send return 0, which the kernel reports on the peer as EPIPE. The FIN
	 * itself is already recorded in the socket's state, which user space propagates. */
	if (len == 0)
		return SK_DROP;
	if (!peer) {
		count(RELAY_STAT_NO_PEER, 1);
		return SK_PASS;
	}
	/* The verdict of one socket runs serialized (under its socket lock), so plain increments of
	 * its counts are exact. */
	struct relay_count *c = bpf_map_lookup_elem(&relay_counts, &cookie);
	if (c) {
		if (c->flags & RELAY_COUNT_BROKEN)
			return SK_DROP; /* the stream has a hole: user space resets the pair */
		long cut = cut_repeated_head(skb, c);
		if (cut < 0)
			return SK_DROP; /* broken: user space resets the pair */
		if (cut >= len)
			return SK_DROP; /* nothing new in it */
		if (cut > 0)
			len = skb->len;
	}
	if (c && (c->parked != peer->taken || (c->redirected + len > peer->budget && !within_limit(peer, c, len)))) {
		/* Behind bytes parked before, or past the budget with no room by the verdict's own
		 * measure: park this one too, in order. */
		__u64 waiting = c->parked - peer->taken;
		if (waiting == 0)
			report(cookie); /* parking starts */
		else if (waiting <= peer->hold && waiting + len > peer->hold)
			report(cookie); /* parked too much: user space holds the sender back */
		c->parked += len;
		count(RELAY_STAT_PARKED, len);
		return SK_PASS;
	}
	__u64 peer_cookie = peer->peer;
	long verdict = bpf_sk_redirect_hash(skb, &targets, &peer_cookie, 0 /* peer's egress */);
	if (verdict == SK_PASS) {
		count(RELAY_STAT_REDIRECTED, 1);
		count(RELAY_STAT_BYTES, len);
		if (c) {
			__u64 before = c->redirected;
			c->redirected = before + len;
			if (before <= peer->notify && before + len > peer->notify)
				report(cookie); /* time to move the budget on */
		}
	} else {
		count(RELAY_STAT_DROPPED, 1);
	}
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
