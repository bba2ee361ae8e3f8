//! RSocket 1.0 frames, the subset PowerSync clients use (protocol.md §3.2): parsing what a
//! client sends and encoding what the server sends. Over WebSocket each message is exactly one
//! frame, without the length prefix RSocket uses on TCP.

use bytes::{BufMut, BytesMut};

const SETUP: u8 = 0x01;
const KEEPALIVE: u8 = 0x03;
const REQUEST_STREAM: u8 = 0x06;
const REQUEST_N: u8 = 0x08;
const CANCEL: u8 = 0x09;
const PAYLOAD: u8 = 0x0A;
const ERROR: u8 = 0x0B;

const FLAG_IGNORE: u16 = 0x200;
const FLAG_METADATA: u16 = 0x100;
const FLAG_FOLLOWS: u16 = 0x80;
const FLAG_COMPLETE: u16 = 0x40;
const FLAG_NEXT: u16 = 0x20;
const FLAG_RESPOND: u16 = 0x80;
const FLAG_RESUME_ENABLE: u16 = 0x80;
const FLAG_LEASE: u16 = 0x40;

/// Frame header: stream id and type/flags.
pub const HEADER_LEN: usize = 6;

/// RSocket error codes the server sends.
pub mod error_code {
    pub const INVALID_SETUP: u32 = 0x001;
    pub const UNSUPPORTED_SETUP: u32 = 0x002;
    pub const REJECTED_SETUP: u32 = 0x003;
    pub const CONNECTION_ERROR: u32 = 0x101;
    pub const APPLICATION_ERROR: u32 = 0x201;
}

/// Metadata and data of a frame that carries a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Payload<'a> {
    pub metadata: Option<&'a [u8]>,
    pub data: &'a [u8],
}

/// A frame received from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Setup(Setup<'a>),
    Keepalive {
        respond: bool,
        data: &'a [u8],
    },
    RequestStream {
        stream_id: u32,
        initial_n: u32,
        follows: bool,
        payload: Payload<'a>,
    },
    RequestN {
        stream_id: u32,
        n: u32,
    },
    Cancel {
        stream_id: u32,
    },
    /// A payload fragment of a request that announced `follows`.
    Payload {
        stream_id: u32,
        follows: bool,
        payload: Payload<'a>,
    },
    Error {
        stream_id: u32,
        code: u32,
        message: &'a [u8],
    },
    /// A type this server does not serve (request-response, channel, metadata push, ...).
    Other {
        stream_id: u32,
        frame_type: u8,
        ignorable: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub struct Setup<'a> {
    pub major: u16,
    pub minor: u16,
    pub keepalive_ms: u32,
    pub lifetime_ms: u32,
    pub lease: bool,
    pub resume: bool,
    pub metadata_mime: &'a [u8],
    pub data_mime: &'a [u8],
    pub payload: Payload<'a>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("RSocket frame truncated")]
    Truncated,
    #[error("RSocket frame has a negative stream id")]
    BadStreamId,
}

/// Reads big-endian fields off the front of a frame.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Result<usize, FrameError> {
        let b = self.take(3)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn payload(mut self, flags: u16) -> Result<Payload<'a>, FrameError> {
        let metadata = if flags & FLAG_METADATA != 0 {
            let len = self.u24()?;
            Some(self.take(len)?)
        } else {
            None
        };
        Ok(Payload { metadata, data: self.0 })
    }
}

/// Parse one frame (a whole WebSocket message).
pub fn parse(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    let mut c = Cursor(frame);
    let stream_id = c.u32()?;
    if stream_id & 0x8000_0000 != 0 {
        return Err(FrameError::BadStreamId);
    }
    let type_flags = c.u16()?;
    let frame_type = (type_flags >> 10) as u8;
    let flags = type_flags & 0x3FF;
    Ok(match frame_type {
        SETUP => Frame::Setup(parse_setup(c, flags)?),
        KEEPALIVE => {
            c.take(8)?; // last received position: resumption is not supported
            Frame::Keepalive {
                respond: flags & FLAG_RESPOND != 0,
                data: c.0,
            }
        }
        REQUEST_STREAM => Frame::RequestStream {
            stream_id,
            initial_n: c.u32()?,
            follows: flags & FLAG_FOLLOWS != 0,
            payload: c.payload(flags)?,
        },
        REQUEST_N => Frame::RequestN { stream_id, n: c.u32()? },
        CANCEL => Frame::Cancel { stream_id },
        PAYLOAD => Frame::Payload {
            stream_id,
            follows: flags & FLAG_FOLLOWS != 0,
            payload: c.payload(flags)?,
        },
        ERROR => Frame::Error {
            stream_id,
            code: c.u32()?,
            message: c.0,
        },
        other => Frame::Other {
            stream_id,
            frame_type: other,
            ignorable: flags & FLAG_IGNORE != 0,
        },
    })
}

fn parse_setup(mut c: Cursor<'_>, flags: u16) -> Result<Setup<'_>, FrameError> {
    let major = c.u16()?;
    let minor = c.u16()?;
    let keepalive_ms = c.u32()?;
    let lifetime_ms = c.u32()?;
    let resume = flags & FLAG_RESUME_ENABLE != 0;
    if resume {
        let len = usize::from(c.u16()?);
        c.take(len)?;
    }
    let len = usize::from(c.u8()?);
    let metadata_mime = c.take(len)?;
    let len = usize::from(c.u8()?);
    let data_mime = c.take(len)?;
    Ok(Setup {
        major,
        minor,
        keepalive_ms,
        lifetime_ms,
        lease: flags & FLAG_LEASE != 0,
        resume,
        metadata_mime,
        data_mime,
        payload: c.payload(flags)?,
    })
}

fn header(out: &mut BytesMut, stream_id: u32, frame_type: u8, flags: u16) {
    out.put_u32(stream_id);
    out.put_u16(u16::from(frame_type) << 10 | flags);
}

/// The header of a PAYLOAD frame carrying one sync line (NEXT, no metadata); the line follows.
pub fn payload_next_header(out: &mut BytesMut, stream_id: u32) {
    header(out, stream_id, PAYLOAD, FLAG_NEXT);
}

/// The PAYLOAD frame that ends a stream normally.
pub fn payload_complete(out: &mut BytesMut, stream_id: u32) {
    header(out, stream_id, PAYLOAD, FLAG_COMPLETE);
}

/// The answer to a KEEPALIVE with RESPOND set: the same data, RESPOND cleared.
pub fn keepalive_answer(out: &mut BytesMut, data: &[u8]) {
    header(out, 0, KEEPALIVE, 0);
    out.put_u64(0);
    out.put_slice(data);
}

pub fn error(out: &mut BytesMut, stream_id: u32, code: u32, message: &str) {
    header(out, stream_id, ERROR, 0);
    out.put_u32(code);
    out.put_slice(message.as_bytes());
}

/// Length in bytes of the frame [`error`] writes.
pub fn error_len(message: &str) -> usize {
    HEADER_LEN + 4 + message.len()
}

/// Length in bytes of the frame [`keepalive_answer`] writes.
pub fn keepalive_answer_len(data: &[u8]) -> usize {
    HEADER_LEN + 8 + data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream_id: u32, frame_type: u8, flags: u16, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        header(&mut out, stream_id, frame_type, flags);
        out.put_slice(body);
        out.to_vec()
    }

    #[test]
    fn setup_as_the_js_client_sends_it() {
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 1, 0, 0]);
        body.extend_from_slice(&20_000u32.to_be_bytes());
        body.extend_from_slice(&90_000u32.to_be_bytes());
        for mime in ["application/json", "application/json"] {
            body.push(mime.len() as u8);
            body.extend_from_slice(mime.as_bytes());
        }
        let metadata = br#"{"token":"Token x"}"#;
        body.extend_from_slice(&(metadata.len() as u32).to_be_bytes()[1..]);
        body.extend_from_slice(metadata);
        let bytes = frame(0, SETUP, FLAG_METADATA, &body);
        let Frame::Setup(setup) = parse(&bytes).expect("parses") else {
            panic!("not a setup")
        };
        assert_eq!(
            (setup.major, setup.minor, setup.keepalive_ms, setup.lifetime_ms),
            (1, 0, 20_000, 90_000)
        );
        assert_eq!(setup.metadata_mime, b"application/json");
        assert_eq!(setup.payload.metadata, Some(&metadata[..]));
        assert_eq!(setup.payload.data, b"");
        assert!(!setup.lease && !setup.resume);
    }

    #[test]
    fn request_stream_request_n_cancel() {
        let mut body = 10u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 2, b'{', b'}']);
        body.extend_from_slice(b"{\"buckets\":[]}");
        let bytes = frame(1, REQUEST_STREAM, FLAG_METADATA, &body);
        assert_eq!(
            parse(&bytes),
            Ok(Frame::RequestStream {
                stream_id: 1,
                initial_n: 10,
                follows: false,
                payload: Payload {
                    metadata: Some(b"{}"),
                    data: b"{\"buckets\":[]}"
                }
            })
        );
        assert_eq!(
            parse(&frame(1, REQUEST_N, 0, &7u32.to_be_bytes())),
            Ok(Frame::RequestN { stream_id: 1, n: 7 })
        );
        assert_eq!(parse(&frame(1, CANCEL, 0, &[])), Ok(Frame::Cancel { stream_id: 1 }));
    }

    #[test]
    fn keepalive_is_answered_with_its_data() {
        let mut body = 0u64.to_be_bytes().to_vec();
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse(&frame(0, KEEPALIVE, FLAG_RESPOND, &body)),
            Ok(Frame::Keepalive {
                respond: true,
                data: b"abc"
            })
        );
        let mut out = BytesMut::new();
        keepalive_answer(&mut out, b"abc");
        assert_eq!(out.len(), keepalive_answer_len(b"abc"));
        assert_eq!(
            parse(&out),
            Ok(Frame::Keepalive {
                respond: false,
                data: b"abc"
            })
        );
    }

    #[test]
    fn truncated_and_malformed_frames_are_errors() {
        assert_eq!(parse(&[0, 0, 0]), Err(FrameError::Truncated));
        assert_eq!(parse(&frame(0x8000_0001, CANCEL, 0, &[])), Err(FrameError::BadStreamId));
        // Metadata longer than the frame.
        assert_eq!(
            parse(&frame(1, REQUEST_STREAM, FLAG_METADATA, &[0, 0, 0, 1, 0, 0, 9, 1])),
            Err(FrameError::Truncated)
        );
        assert_eq!(parse(&frame(1, REQUEST_N, 0, &[0, 0])), Err(FrameError::Truncated));
    }

    #[test]
    fn server_frames() {
        let mut out = BytesMut::new();
        error(&mut out, 0, error_code::REJECTED_SETUP, "[PSYNC_S2101] bad");
        assert_eq!(out.len(), error_len("[PSYNC_S2101] bad"));
        assert_eq!(
            parse(&out),
            Ok(Frame::Error {
                stream_id: 0,
                code: 3,
                message: b"[PSYNC_S2101] bad"
            })
        );
        let mut out = BytesMut::new();
        payload_complete(&mut out, 1);
        assert_eq!(
            parse(&out),
            Ok(Frame::Payload {
                stream_id: 1,
                follows: false,
                payload: Payload::default()
            })
        );
        let mut out = BytesMut::new();
        payload_next_header(&mut out, 1);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(&out[4..], &[(PAYLOAD << 2), 0x20]);
    }
}
