use bytes::Bytes;

/// Where a final frame may be inserted without breaking a message in two.
///
/// ```
/// use tower_drain::frame::Boundary;
/// assert_ne!(Boundary::Sse, Boundary::Lines);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Boundary {
    /// Server-Sent Events: after a blank line (`\n\n`, `\r\n\r\n`, `\r\r`, or mixed).
    Sse,
    /// Newline-delimited records (NDJSON): after `\n`.
    Lines,
    /// gRPC's length-prefixed messages (1-byte flag, 4-byte big-endian length, payload).
    LengthPrefixed,
    /// Every body frame is a whole message.
    Frames,
}

/// O(1) per data frame: remembers only the last bytes (or the bytes left in the current
/// length-prefixed message), never buffers the stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tracker {
    kind: Boundary,
    tail_len: u8,
    header_len: u8,
    /// The stream's last (up to) four bytes, the newest in the low byte.
    tail: u32,
    /// The length field of a length-prefixed message header read so far.
    header: u32,
    /// Bytes left in the current length-prefixed message (gRPC lengths are 32-bit).
    remaining: u32,
}

impl Tracker {
    pub(crate) fn new(kind: Boundary) -> Self {
        Self {
            kind,
            tail_len: 0,
            header_len: 0,
            tail: 0,
            header: 0,
            remaining: 0,
        }
    }

    /// Called for every forwarded data frame: a few instructions for text protocols (one load
    /// of the last four bytes, no copy of the frame).
    #[inline(always)]
    pub(crate) fn update(&mut self, data: &Bytes) {
        match self.kind {
            Boundary::Sse | Boundary::Lines => {
                let last4 = data
                    .len()
                    .checked_sub(4)
                    .and_then(|i| <[u8; 4]>::try_from(&data[i..]).ok());
                match last4 {
                    Some(last) => {
                        self.tail = u32::from_be_bytes(last);
                        self.tail_len = 4;
                    }
                    None => self.update_short(data),
                }
            }
            Boundary::LengthPrefixed => self.update_length_prefixed(data),
            Boundary::Frames => {}
        }
    }

    /// A data frame of fewer than four bytes: shift its bytes in.
    #[cold]
    fn update_short(&mut self, data: &[u8]) {
        for &b in data {
            self.tail = (self.tail << 8) | u32::from(b);
        }
        self.tail_len = (self.tail_len + data.len() as u8).min(4);
    }

    fn update_length_prefixed(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            if self.remaining > 0 {
                let skip = (self.remaining as usize).min(rest.len());
                self.remaining -= skip as u32;
                rest = &rest[skip..];
                continue;
            }
            // A header byte: the compression flag (skipped), then the 4-byte big-endian length.
            if self.header_len > 0 {
                self.header = (self.header << 8) | u32::from(rest[0]);
            }
            rest = &rest[1..];
            self.header_len += 1;
            if self.header_len == 5 {
                self.remaining = std::mem::take(&mut self.header);
                self.header_len = 0;
            }
        }
    }

    #[inline]
    pub(crate) fn at_boundary(&self) -> bool {
        let bytes = self.tail.to_be_bytes();
        let t = &bytes[4 - self.tail_len as usize..];
        match self.kind {
            Boundary::Frames => true,
            Boundary::LengthPrefixed => self.header_len == 0 && self.remaining == 0,
            Boundary::Lines => t.is_empty() || t.ends_with(b"\n"),
            Boundary::Sse => {
                if t.is_empty() {
                    return true;
                }
                // Strip one line terminator, then require another one before it.
                let rest = if t.ends_with(b"\r\n") {
                    &t[..t.len() - 2]
                } else if t.ends_with(b"\n") || t.ends_with(b"\r") {
                    &t[..t.len() - 1]
                } else {
                    return false;
                };
                rest.ends_with(b"\n") || rest.ends_with(b"\r")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(kind: Boundary, parts: &[&[u8]]) -> bool {
        let mut t = Tracker::new(kind);
        for p in parts {
            t.update(&Bytes::copy_from_slice(p));
        }
        t.at_boundary()
    }

    #[test]
    fn sse_boundaries() {
        assert!(feed(Boundary::Sse, &[]));
        assert!(feed(Boundary::Sse, &[b"data: a\n\n"]));
        assert!(feed(Boundary::Sse, &[b"data: a\r\n\r\n"]));
        assert!(feed(Boundary::Sse, &[b"data: a\r\r"]));
        assert!(feed(Boundary::Sse, &[b"data: a\n", b"\n"]));
        assert!(feed(Boundary::Sse, &[b"data: a\r\n", b"\r", b"\n"]));
        assert!(feed(Boundary::Sse, &[b"data: a\r\n\n"]));
        assert!(!feed(Boundary::Sse, &[b"data: a\n"]));
        assert!(!feed(Boundary::Sse, &[b"data: a\r\n"]));
        assert!(!feed(Boundary::Sse, &[b"data: a\n\n", b"event: x\n"]));
        assert!(!feed(Boundary::Sse, &[b"data: a\n\n", b"ev"]));
        assert!(!feed(Boundary::Sse, &[b"x\r", b"\n"]));
        assert!(feed(Boundary::Sse, &[b"x", b"\n", b"\n"]));
        // Short frames shift into the remembered tail; long ones replace it.
        assert!(feed(Boundary::Sse, &[b"abcdef", b"\r\n", b"\r", b"\n"]));
        assert!(!feed(Boundary::Sse, &[b"\n\n", b"abcdefgh"]));
        assert!(feed(
            Boundary::Sse,
            &[b"a", b"b", b"c", b"d", b"e", b"\n", b"\n"]
        ));
        assert!(feed(Boundary::Sse, &[b"\n", b"\r"]));
        assert!(!feed(Boundary::Lines, &[b"{}\n", b"{\"a\":1}"]));
        assert!(feed(Boundary::Lines, &[b"{\"a\":1}", b"\n"]));
    }

    #[test]
    fn line_boundaries() {
        assert!(feed(Boundary::Lines, &[]));
        assert!(feed(Boundary::Lines, &[b"{}\n"]));
        assert!(!feed(Boundary::Lines, &[b"{}\n{"]));
    }

    #[test]
    fn length_prefixed_boundaries() {
        let msg = [0u8, 0, 0, 0, 3, b'a', b'b', b'c'];
        assert!(feed(Boundary::LengthPrefixed, &[&msg]));
        assert!(!feed(Boundary::LengthPrefixed, &[&msg[..2]]));
        assert!(!feed(Boundary::LengthPrefixed, &[&msg[..6]]));
        assert!(feed(
            Boundary::LengthPrefixed,
            &[&msg[..2], &msg[2..7], &msg[7..]]
        ));
        let two: Vec<u8> = msg.iter().chain(msg.iter()).copied().collect();
        assert!(feed(Boundary::LengthPrefixed, &[&two]));
        assert!(!feed(Boundary::LengthPrefixed, &[&two[..9]]));
        assert!(feed(Boundary::LengthPrefixed, &[&[0, 0, 0, 0, 0]]));
        // A multi-byte length (258) after a set compression flag, split inside the header.
        let mut big = vec![1u8, 0, 0, 1, 2];
        big.extend(std::iter::repeat_n(b'x', 258));
        assert!(feed(Boundary::LengthPrefixed, &[&big]));
        assert!(feed(Boundary::LengthPrefixed, &[&big[..3], &big[3..]]));
        assert!(!feed(Boundary::LengthPrefixed, &[&big[..big.len() - 1]]));
        assert!(!feed(Boundary::LengthPrefixed, &[&big[..6]]));
    }
}
