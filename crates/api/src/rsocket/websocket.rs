//! The server side of WebSocket framing (RFC 6455) on an upgraded connection: the handshake
//! key, reading client messages (unmasking, reassembling fragments, answering pings) and the
//! headers of the binary messages the server writes.
//!
//! Frame headers are parsed and written by tungstenite; the buffers are ours. A held sync
//! stream is idle nearly all the time, and tungstenite's `WebSocketStream` keeps a 128 KiB read
//! buffer plus a write buffer the size of the largest message for the connection's lifetime;
//! here an idle connection holds no buffer at all.

use bytes::{BufMut, BytesMut};
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A binary (or text) message: one RSocket frame.
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("malformed WebSocket frame: {0}")]
    Malformed(String),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("WebSocket message of {0} bytes is over the limit")]
    TooLarge(u64),
    #[error("unexpected WebSocket continuation frame")]
    Continuation,
}

impl WsError {
    /// The close code the server answers this error with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            WsError::TooLarge(_) => CloseCode::Size,
            _ => CloseCode::Protocol,
        }
    }
}

/// Client bytes not yet consumed, and the message being reassembled from fragments.
#[derive(Default)]
pub struct Reader {
    partial: Vec<u8>,
    fragments: Option<Vec<u8>>,
    max_message: usize,
}

impl Reader {
    pub fn new(max_message: usize) -> Self {
        Reader {
            max_message,
            ..Reader::default()
        }
    }

    /// Append bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
    }

    /// The next complete message, if the bytes pushed so far hold one.
    pub fn next_message(&mut self) -> Result<Option<Message>, WsError> {
        loop {
            let mut cursor = Cursor::new(&self.partial[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor).map_err(|e| WsError::Malformed(e.to_string()))? else {
                self.release();
                return Ok(None);
            };
            let limit = self.max_message.saturating_sub(self.fragments.as_ref().map_or(0, Vec::len));
            if len > limit as u64 {
                return Err(WsError::TooLarge(len));
            }
            let start = cursor.position() as usize;
            let end = start + len as usize;
            if self.partial.len() < end {
                return Ok(None);
            }
            let mask = header.mask.ok_or(WsError::Unmasked)?;
            let mut payload = self.partial[start..end].to_vec();
            self.partial.drain(..end);
            unmask(&mut payload, mask);
            if let Some(message) = self.on_frame(&header, payload)? {
                self.release();
                return Ok(Some(message));
            }
        }
    }

    fn on_frame(&mut self, header: &FrameHeader, payload: Vec<u8>) -> Result<Option<Message>, WsError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Malformed("reserved bits set without an extension".into()));
        }
        Ok(match header.opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload)),
            OpCode::Control(Control::Pong) => Some(Message::Pong),
            OpCode::Control(Control::Close) => Some(Message::Close),
            OpCode::Control(Control::Reserved(c)) => return Err(WsError::Malformed(format!("reserved control opcode {c}"))),
            OpCode::Data(Data::Reserved(c)) => return Err(WsError::Malformed(format!("reserved data opcode {c}"))),
            OpCode::Data(Data::Continue) => {
                let Some(mut message) = self.fragments.take() else {
                    return Err(WsError::Continuation);
                };
                message.extend_from_slice(&payload);
                if header.is_final {
                    Some(Message::Data(message))
                } else {
                    self.fragments = Some(message);
                    None
                }
            }
            OpCode::Data(Data::Binary | Data::Text) => {
                if self.fragments.is_some() {
                    return Err(WsError::Malformed("new message inside a fragmented one".into()));
                }
                if header.is_final {
                    Some(Message::Data(payload))
                } else {
                    self.fragments = Some(payload);
                    None
                }
            }
        })
    }

    /// Give the buffer's memory back once everything pushed has been consumed: an idle
    /// connection holds nothing.
    fn release(&mut self) {
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            self.partial = Vec::new();
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Most bytes a server frame header takes.
pub const MAX_HEADER_LEN: usize = 10;

fn frame_header(out: &mut BytesMut, opcode: OpCode, len: usize) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    // Writing into memory cannot fail.
    let _ = header.format(len as u64, &mut out.writer());
}

/// The header of a binary message of `len` bytes; the message follows.
pub fn binary_header(out: &mut BytesMut, len: usize) {
    frame_header(out, OpCode::Data(Data::Binary), len);
}

pub fn pong(out: &mut BytesMut, data: &[u8]) {
    frame_header(out, OpCode::Control(Control::Pong), data.len());
    out.put_slice(data);
}

pub fn close(out: &mut BytesMut, code: CloseCode) {
    frame_header(out, OpCode::Control(Control::Close), 2);
    out.put_u16(code.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as browsers and Node send it: masked.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn messages_arrive_byte_by_byte_and_fragmented() {
        let mut bytes = client_frame(0x2, false, b"hel");
        bytes.extend(client_frame(0x9, true, b"p")); // a ping between fragments
        bytes.extend(client_frame(0x0, true, b"lo"));
        bytes.extend(client_frame(0x2, true, &vec![7; 70_000]));
        let mut reader = Reader::new(1 << 20);
        let mut got = Vec::new();
        for b in bytes {
            reader.push(&[b]);
            while let Some(m) = reader.next_message().expect("valid") {
                got.push(m);
            }
        }
        assert_eq!(
            got,
            vec![
                Message::Ping(b"p".to_vec()),
                Message::Data(b"hello".to_vec()),
                Message::Data(vec![7; 70_000])
            ]
        );
        assert_eq!(reader.partial.capacity(), 0, "nothing is held once consumed");
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut reader = Reader::new(100);
        reader.push(&client_frame(0x2, true, &[0; 101]));
        assert_eq!(reader.next_message(), Err(WsError::TooLarge(101)));

        let mut reader = Reader::new(100);
        reader.push(&[0x82, 0x01, 0x00]);
        assert_eq!(reader.next_message(), Err(WsError::Unmasked));

        let mut reader = Reader::new(100);
        reader.push(&client_frame(0x0, true, b"x"));
        assert_eq!(reader.next_message(), Err(WsError::Continuation));

        let mut reader = Reader::new(100);
        reader.push(&client_frame(0x3, true, b"x"));
        assert!(matches!(reader.next_message(), Err(WsError::Malformed(_))));

        // Fragments add up against the limit.
        let mut reader = Reader::new(100);
        reader.push(&client_frame(0x2, false, &[0; 60]));
        reader.push(&client_frame(0x0, true, &[0; 60]));
        assert_eq!(reader.next_message(), Err(WsError::TooLarge(60)));
    }

    #[test]
    fn server_headers() {
        let mut out = BytesMut::new();
        binary_header(&mut out, 5);
        assert_eq!(&out[..], &[0x82, 5]);
        let mut out = BytesMut::new();
        binary_header(&mut out, 70_000);
        assert_eq!(out[..2], [0x82, 127]);
        assert_eq!(out.len(), MAX_HEADER_LEN);
        let mut out = BytesMut::new();
        close(&mut out, CloseCode::Normal);
        assert_eq!(&out[..], &[0x88, 2, 0x03, 0xE8]);
        // RFC 6455's example key.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
