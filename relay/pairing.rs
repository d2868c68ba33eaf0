//! Who pairs with whom: arrival order, or equal tokens sent as a first line. Pure logic, no I/O.
use std::collections::{HashMap, VecDeque};

/// Longest token, in bytes (the line is at most this plus its `\n`).
pub const MAX_TOKEN: usize = 64;

/// What a client's first bytes say about its token line.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenLine {
    /// No newline yet and still short enough: wait for more bytes.
    Incomplete,
    /// A valid token; `line_len` bytes (token and `\n`) are to be consumed.
    Complete { token: String, line_len: usize },
    /// Not a token line: the client is closed.
    Malformed(&'static str),
}

/// Reads a token line from the start of `bytes` (what a peek returned).
pub fn parse_token_line(bytes: &[u8]) -> TokenLine {
    // The longest line: a 64-byte token, `\r`, `\n` (a window one byte shorter refused the longest
    // token from `nc -C` and telnet clients as too long).
    let window = &bytes[..bytes.len().min(MAX_TOKEN + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => TokenLine::Malformed("empty token"),
        Some(n) => {
            let token = &window[..n];
            let token = token.strip_suffix(b"\r").unwrap_or(token);
            if token.is_empty() {
                TokenLine::Malformed("empty token")
            } else if token.len() > MAX_TOKEN {
                TokenLine::Malformed("token longer than 64 bytes")
            } else if !token.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                TokenLine::Malformed("token has bytes that are not printable ASCII")
            } else {
                TokenLine::Complete { token: String::from_utf8_lossy(token).into_owned(), line_len: n + 1 }
            }
        }
        None if window.iter().any(|b| !(b.is_ascii_graphic() || *b == b' ' || *b == b'\r')) => {
            TokenLine::Malformed("token has bytes that are not printable ASCII")
        }
        // 64 bytes and a `\r` may still end well.
        None if window.len() > MAX_TOKEN + 1 || (window.len() == MAX_TOKEN + 1 && window[MAX_TOKEN] != b'\r') => {
            TokenLine::Malformed("token longer than 64 bytes")
        }
        None => TokenLine::Incomplete,
    }
}

/// Clients waiting for a partner, by the key they pair on (one key for arrival order).
#[derive(Debug, Default)]
pub struct Matcher<Id: Copy + Eq> {
    waiting: HashMap<String, VecDeque<Id>>,
}

impl<Id: Copy + Eq> Matcher<Id> {
    /// Offers `id` for pairing under `key`: returns the partner that waited longest, or records
    /// `id` as waiting.
    pub fn offer(&mut self, key: &str, id: Id) -> Option<Id> {
        let queue = self.waiting.entry(key.to_string()).or_default();
        match queue.pop_front() {
            Some(partner) => {
                if queue.is_empty() {
                    self.waiting.remove(key);
                }
                Some(partner)
            }
            None => {
                queue.push_back(id);
                None
            }
        }
    }

    /// Forgets a waiting client (it left or timed out).
    pub fn withdraw(&mut self, key: &str, id: Id) {
        if let Some(queue) = self.waiting.get_mut(key) {
            queue.retain(|w| *w != id);
            if queue.is_empty() {
                self.waiting.remove(key);
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines() {
        assert_eq!(parse_token_line(b"abc\nrest"), TokenLine::Complete { token: "abc".into(), line_len: 4 });
        assert_eq!(parse_token_line(b"abc\r\n"), TokenLine::Complete { token: "abc".into(), line_len: 5 });
        assert_eq!(parse_token_line(b"ab"), TokenLine::Incomplete);
        assert_eq!(parse_token_line(b""), TokenLine::Incomplete);
        assert!(matches!(parse_token_line(b"\n"), TokenLine::Malformed(_)));
        assert!(matches!(parse_token_line(b"a\x01b\n"), TokenLine::Malformed(_)));
        assert!(matches!(parse_token_line(b"a\x01"), TokenLine::Malformed(_)));
        let max = vec![b'x'; MAX_TOKEN];
        let mut line = max.clone();
        line.push(b'\n');
        assert_eq!(parse_token_line(&line), TokenLine::Complete { token: "x".repeat(64), line_len: 65 });
        assert_eq!(parse_token_line(&max), TokenLine::Incomplete);
        let mut crlf = max.clone();
        crlf.push(b'\r');
        assert_eq!(parse_token_line(&crlf), TokenLine::Incomplete);
        crlf.push(b'\n');
        assert_eq!(parse_token_line(&crlf), TokenLine::Complete { token: "x".repeat(64), line_len: 66 });
        let mut long = vec![b'x'; MAX_TOKEN + 1];
        long.push(b'\r');
        long.push(b'\n');
        assert_eq!(parse_token_line(&long), TokenLine::Malformed("token longer than 64 bytes"));
        long.truncate(MAX_TOKEN + 1);
        assert!(matches!(parse_token_line(&long), TokenLine::Malformed(_)));
        long.push(b'\n');
        assert!(matches!(parse_token_line(&long), TokenLine::Malformed(_)));
    }

    #[test]
    fn pairs_by_key_in_arrival_order() {
        let mut m = Matcher::default();
        assert_eq!(m.offer("a", 1), None);
        assert_eq!(m.offer("b", 2), None);
        assert_eq!(m.offer("a", 3), Some(1));
        // a third client with an already paired token waits for a new partner
        assert_eq!(m.offer("a", 4), None);
        assert_eq!(m.waiting(), 2);
        m.withdraw("a", 4);
        assert_eq!(m.offer("a", 5), None);
        assert_eq!(m.offer("a", 6), Some(5));
        assert_eq!(m.offer("b", 7), Some(2));
        assert_eq!(m.waiting(), 0);
    }
}
