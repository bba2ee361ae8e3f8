//! RSocket 1.0 frames as the PowerSync JS SDK exchanges them over WebSocket (protocol.md §3.2,
//! §3.3): the client frames it sends (SETUP, REQUEST_STREAM, REQUEST_N, KEEPALIVE) and what the
//! client needs from server frames (lines, completion, errors). One frame per WebSocket message,
//! so no length prefix.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::ops::Range;
use std::time::Duration;

const SETUP: u8 = 0x01;
const KEEPALIVE: u8 = 0x03;
const REQUEST_STREAM: u8 = 0x06;
const REQUEST_N: u8 = 0x08;
const PAYLOAD: u8 = 0x0A;
const ERROR: u8 = 0x0B;

const FLAG_METADATA: u16 = 0x100;
const FLAG_FOLLOWS: u16 = 0x80;
const FLAG_RESPOND: u16 = 0x80;
const FLAG_COMPLETE: u16 = 0x40;
const FLAG_NEXT: u16 = 0x20;

/// The stream the SDK requests the sync stream on.
const STREAM_ID: u32 = 1;
/// Credit the SDK keeps outstanding ("buffered" fetch strategy, the default).
pub const CREDIT: u32 = 10;
/// The SDK's keepalive period and lifetime (SETUP).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(20);
const LIFETIME: Duration = Duration::from_secs(90);
const MIME: &[u8] = b"application/json";

fn header(out: &mut Vec<u8>, stream_id: u32, frame_type: u8, flags: u16) {
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(&(u16::from(frame_type) << 10 | flags).to_be_bytes());
}

/// A payload's metadata: 24-bit length, then the bytes.
fn metadata(out: &mut Vec<u8>, metadata: &[u8]) -> Result<()> {
    let len = u32::try_from(metadata.len())
        .ok()
        .filter(|&l| l < 1 << 24)
        .context("RSocket metadata over 16 MiB")?;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(metadata);
    Ok(())
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// SETUP as the SDK sends it: JSON metadata with the whole Authorization value, no data.
pub fn setup_frame(token: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128 + token.len());
    header(&mut out, 0, SETUP, FLAG_METADATA);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&millis(KEEPALIVE_EVERY).to_be_bytes());
    out.extend_from_slice(&millis(LIFETIME).to_be_bytes());
    for mime in [MIME, MIME] {
        out.push(mime.len() as u8);
        out.extend_from_slice(mime);
    }
    let meta = json!({"token": format!("Token {token}"), "user_agent": "ferrosync-bench"});
    metadata(&mut out, &serde_json::to_vec(&meta)?)?;
    Ok(out)
}

pub fn request_stream_frame(body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + body.len());
    header(&mut out, STREAM_ID, REQUEST_STREAM, FLAG_METADATA);
    out.extend_from_slice(&CREDIT.to_be_bytes());
    metadata(&mut out, br#"{"path":"/sync/stream"}"#)?;
    out.extend_from_slice(body);
    Ok(out)
}

pub fn request_n_frame(n: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    header(&mut out, STREAM_ID, REQUEST_N, 0);
    out.extend_from_slice(&n.to_be_bytes());
    out
}

pub fn keepalive_frame() -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    header(&mut out, 0, KEEPALIVE, FLAG_RESPOND);
    out.extend_from_slice(&0u64.to_be_bytes());
    out
}

/// What a server frame means to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A sync line: this range of the frame.
    Line(Range<usize>),
    Complete,
    /// Keepalive echoes and frames for other streams.
    Other,
}

/// Parse one server frame; an ERROR frame is an error.
pub fn parse(frame: &[u8]) -> Result<Received> {
    let head = frame.get(..6).context("RSocket frame shorter than its header")?;
    let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let type_flags = u16::from_be_bytes([head[4], head[5]]);
    let (frame_type, flags) = ((type_flags >> 10) as u8, type_flags & 0x3FF);
    match frame_type {
        ERROR => {
            let code = frame.get(6..10).context("truncated RSocket ERROR")?;
            let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
            let message = String::from_utf8_lossy(&frame[10..]);
            bail!("RSocket ERROR {code:#x} on stream {stream_id}: {message}")
        }
        PAYLOAD if stream_id == STREAM_ID => {
            if flags & FLAG_FOLLOWS != 0 {
                bail!("fragmented RSocket PAYLOAD (the service must send whole lines)");
            }
            if flags & FLAG_NEXT != 0 {
                return Ok(Received::Line(payload_data(frame, flags)?));
            }
            if flags & FLAG_COMPLETE != 0 {
                return Ok(Received::Complete);
            }
            Ok(Received::Other)
        }
        _ => Ok(Received::Other),
    }
}

/// The data of a PAYLOAD frame: after the header and any metadata.
fn payload_data(frame: &[u8], flags: u16) -> Result<Range<usize>> {
    let mut start = 6;
    if flags & FLAG_METADATA != 0 {
        let len = frame.get(6..9).context("truncated PAYLOAD metadata length")?;
        start = 9 + (usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]));
    }
    if start > frame.len() {
        bail!("PAYLOAD metadata longer than the frame");
    }
    Ok(start..frame.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_as_the_sdk_sends_them() {
        let setup = setup_frame("jwt").expect("setup");
        assert_eq!(&setup[..6], &[0, 0, 0, 0, 0x05, 0x00], "stream 0, SETUP with METADATA");
        assert_eq!(&setup[6..10], &[0, 1, 0, 0], "version 1.0");
        assert_eq!(
            &setup[10..18],
            &[0, 0, 0x4E, 0x20, 0, 1, 0x5F, 0x90],
            "20 s keepalive, 90 s lifetime"
        );
        let meta = &setup[18 + 2 * (1 + MIME.len()) + 3..];
        let meta: serde_json::Value = serde_json::from_slice(meta).expect("JSON metadata");
        assert_eq!(meta["token"], "Token jwt");

        let request = request_stream_frame(b"{}").expect("request");
        assert_eq!(&request[..6], &[0, 0, 0, 1, 0x19, 0x00], "stream 1, REQUEST_STREAM with METADATA");
        assert_eq!(&request[6..10], &10u32.to_be_bytes(), "initial N");
        let path = br#"{"path":"/sync/stream"}"#;
        assert_eq!(&request[10..13], &[0, 0, path.len() as u8]);
        assert_eq!(&request[13..13 + path.len()], path);
        assert_eq!(&request[13 + path.len()..], b"{}");

        assert_eq!(request_n_frame(3), [0, 0, 0, 1, 0x20, 0, 0, 0, 0, 3]);
        assert_eq!(&keepalive_frame()[..6], &[0, 0, 0, 0, 0x0C, 0x80], "KEEPALIVE with RESPOND");
    }

    #[test]
    fn server_frames() {
        let mut next = Vec::new();
        header(&mut next, STREAM_ID, PAYLOAD, FLAG_NEXT);
        next.extend_from_slice(b"line");
        assert_eq!(parse(&next).expect("payload"), Received::Line(6..10));

        let mut with_meta = Vec::new();
        header(&mut with_meta, STREAM_ID, PAYLOAD, FLAG_NEXT | FLAG_METADATA);
        with_meta.extend_from_slice(&[0, 0, 2, b'{', b'}']);
        with_meta.extend_from_slice(b"line");
        assert_eq!(parse(&with_meta).expect("payload"), Received::Line(11..15));

        let mut complete = Vec::new();
        header(&mut complete, STREAM_ID, PAYLOAD, FLAG_COMPLETE);
        assert_eq!(parse(&complete).expect("complete"), Received::Complete);

        let mut echo = Vec::new();
        header(&mut echo, 0, KEEPALIVE, 0);
        echo.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&echo).expect("keepalive"), Received::Other);

        let mut error = Vec::new();
        header(&mut error, 0, ERROR, 0);
        error.extend_from_slice(&3u32.to_be_bytes());
        error.extend_from_slice(b"[PSYNC_S2101] bad token");
        let e = parse(&error).expect_err("an error");
        assert!(format!("{e}").contains("0x3 on stream 0: [PSYNC_S2101] bad token"), "{e}");

        let mut truncated = Vec::new();
        header(&mut truncated, STREAM_ID, PAYLOAD, FLAG_NEXT | FLAG_METADATA);
        truncated.extend_from_slice(&[0, 0, 9]);
        assert!(parse(&truncated).is_err());
        assert!(parse(&[0, 0, 0]).is_err());
    }
}
