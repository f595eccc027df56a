//! A minimal cleartext HTTP/2 client (prior knowledge) that shows every frame the server
//! sends: GOAWAY, RST_STREAM, END_STREAM. Test code only: HPACK literals without indexing,
//! no flow control beyond a large initial window, answers SETTINGS and PING.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

/// One frame from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn ends_stream(&self) -> bool {
        matches!(self.kind, DATA | HEADERS) && self.flags & END_STREAM != 0
    }

    /// GOAWAY: the last stream id the server will process.
    pub fn last_stream_id(&self) -> u32 {
        u32::from_be_bytes(self.payload[..4].try_into().unwrap()) & 0x7fff_ffff
    }
}

pub struct H2 {
    tcp: TcpStream,
    next_stream: u32,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00); // literal without indexing, new name, no Huffman
    out.push(name.len() as u8);
    out.extend(name.as_bytes());
    out.push(value.len() as u8);
    out.extend(value.as_bytes());
}

impl H2 {
    /// Connects, sends the preface and SETTINGS, and opens the connection window wide.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with_window(addr, 1 << 20).await
    }

    /// Like [`connect`](Self::connect), with this initial window per stream: with 0 the
    /// server can send no DATA at all, like a client that stopped reading.
    pub async fn connect_with_window(addr: SocketAddr, window: u32) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE (0x4).
        let mut settings = vec![0x00, 0x04];
        settings.extend(window.to_be_bytes());
        out.extend(frame(SETTINGS, 0, 0, &settings));
        out.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 24).to_be_bytes()));
        tcp.write_all(&out).await.unwrap();
        Self {
            tcp,
            next_stream: 1,
        }
    }

    /// Sends `GET path` on a new stream (request ends with its headers); returns the id.
    pub async fn get(&mut self, addr: SocketAddr, path: &str) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        literal(&mut block, ":method", "GET");
        literal(&mut block, ":scheme", "http");
        literal(&mut block, ":path", path);
        literal(&mut block, ":authority", &addr.to_string());
        // END_STREAM | END_HEADERS
        self.tcp
            .write_all(&frame(HEADERS, 0x1 | 0x4, id, &block))
            .await
            .unwrap();
        id
    }

    /// Sends a unary gRPC call (`POST path`, one length-prefixed `message`) on a new stream;
    /// returns the id.
    pub async fn grpc(&mut self, addr: SocketAddr, path: &str, message: &[u8]) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = Vec::new();
        literal(&mut block, ":method", "POST");
        literal(&mut block, ":scheme", "http");
        literal(&mut block, ":path", path);
        literal(&mut block, ":authority", &addr.to_string());
        literal(&mut block, "content-type", "application/grpc");
        literal(&mut block, "te", "trailers");
        let mut data = vec![0];
        data.extend((message.len() as u32).to_be_bytes());
        data.extend(message);
        let mut out = frame(HEADERS, 0x4, id, &block); // END_HEADERS
        out.extend(frame(DATA, END_STREAM, id, &data));
        self.tcp.write_all(&out).await.unwrap();
        id
    }

    /// Connects and sends a unary gRPC call in the same write as the preface (as a client
    /// does that does not wait for the server's SETTINGS).
    pub async fn connect_and_grpc(addr: SocketAddr, path: &str, message: &[u8]) -> (Self, u32) {
        let mut h2 = Self::connect(addr).await;
        let id = h2.grpc(addr, path, message).await;
        (h2, id)
    }

    /// The next frame that is not connection bookkeeping (SETTINGS, PING, WINDOW_UPDATE are
    /// answered or skipped); `None` at EOF or a reset.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            let mut head = [0u8; 9];
            if self.tcp.read_exact(&mut head).await.is_err() {
                return None;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            if self.tcp.read_exact(&mut payload).await.is_err() {
                return None;
            }
            let f = Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload,
            };
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    let _ = self.tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                SETTINGS | WINDOW_UPDATE => {}
                PING if f.flags & ACK == 0 => {
                    let _ = self.tcp.write_all(&frame(PING, ACK, 0, &f.payload)).await;
                }
                PING => {}
                _ => return Some(f),
            }
        }
    }
}
