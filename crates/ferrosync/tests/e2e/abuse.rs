//! Abuse, run against both transports: forged and invalid tokens, garbage and truncated frames,
//! truncated BSON, unknown routes and MIME types, and a flood of connects beyond the limit.
//! Each is rejected with its code, and the process keeps serving a well-behaved client.

use crate::harness::*;
use crate::ws_client::*;
use anyhow::{Context, Result};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);
const MAX_CONNECTIONS: usize = 4;
const REJECTED_SETUP: u32 = 0x003;
const APPLICATION_ERROR: u32 = 0x201;

/// An RSA key made for this run, with its public JWK and PEM.
struct RsaKey {
    private: EncodingKey,
    jwk: Value,
    public_pem: String,
}

fn rsa_key(dir: &Path) -> Result<RsaKey> {
    let key_path = dir.join("rsa.pem");
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&key_path)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let pem = std::fs::read(&key_path)?;
    let public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key_path)
        .output()?;
    let private = EncodingKey::from_rsa_pem(&pem)?;
    let jwk = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&private, Algorithm::RS256)?)?;
    Ok(RsaKey {
        private,
        jwk,
        public_pem: String::from_utf8(public.stdout)?,
    })
}

/// Add the RSA key (kid `rsa1`) beside the HS256 key and set the connection limit.
fn configure(dir: &Path, rsa: &RsaKey) -> Result<()> {
    let path = dir.join("powersync.yaml");
    let config = std::fs::read_to_string(&path)?;
    let rsa_line = format!(
        "      - {{kty: RSA, alg: RS256, kid: rsa1, n: {}, e: {}}}\n",
        rsa.jwk["n"].as_str().context("n")?,
        rsa.jwk["e"].as_str().context("e")?
    );
    let at = config.find("kid: k1").context("the HS key line")?;
    let line_end = at + config[at..].find('\n').context("end of line")? + 1;
    let mut config = format!("{}{rsa_line}{}", &config[..line_end], &config[line_end..]);
    config.push_str(&format!("api:\n  parameters:\n    max_concurrent_connections: {MAX_CONNECTIONS}\n"));
    std::fs::write(path, config)?;
    Ok(())
}

fn claims(extra: Value) -> Value {
    let t = now();
    let mut claims = json!({"sub": "u1", "aud": "test-aud", "iat": t, "exp": t + 600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    claims
}

fn signed(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> Result<String> {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    Ok(jsonwebtoken::encode(&header, claims, key)?)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `(name, Authorization value or None, the code it must be rejected with)`.
fn token_cases(rsa: &RsaKey) -> Result<Vec<(&'static str, Option<String>, &'static str)>> {
    let t = now() as i64;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let valid = claims(json!({}));
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        b64(valid.to_string().as_bytes())
    );
    // Key confusion both ways: an RS256 token naming the HS key, and an HS256 token whose
    // secret is the RSA public key, naming the RSA key.
    let rs_for_hs_key = signed(Algorithm::RS256, "k1", &rsa.private, &valid)?;
    let hs_with_public_key = signed(
        Algorithm::HS256,
        "rsa1",
        &EncodingKey::from_secret(rsa.public_pem.as_bytes()),
        &valid,
    )?;
    let tok = |s: String| Some(format!("Token {s}"));
    Ok(vec![
        ("no token", None, "PSYNC_S2106"),
        ("not a JWT", tok("not-a-jwt".into()), "PSYNC_S2101"),
        ("alg none", tok(unsigned), "PSYNC_S2101"),
        ("RS256 token for the HS key", tok(rs_for_hs_key), "PSYNC_S2101"),
        ("HS256 signed with the RSA public key", tok(hs_with_public_key), "PSYNC_S2101"),
        (
            "wrong secret",
            tok(signed(Algorithm::HS256, "k1", &EncodingKey::from_secret(b"wrong"), &valid)?),
            "PSYNC_S2102",
        ),
        (
            "expired",
            tok(signed(
                Algorithm::HS256,
                "k1",
                &hs,
                &claims(json!({"iat": t - 7200, "exp": t - 3600})),
            )?),
            "PSYNC_S2103",
        ),
        (
            "not yet valid",
            tok(signed(Algorithm::HS256, "k1", &hs, &claims(json!({"nbf": t + 3600})))?),
            "PSYNC_S2101",
        ),
        (
            "wrong audience",
            tok(signed(Algorithm::HS256, "k1", &hs, &claims(json!({"aud": "other"})))?),
            "PSYNC_S2105",
        ),
        ("unknown kid", tok(signed(Algorithm::HS256, "nope", &hs, &valid)?), "PSYNC_S2101"),
        (
            "oversized",
            tok(signed(
                Algorithm::HS256,
                "k1",
                &hs,
                &claims(json!({"padding": "x".repeat(64 * 1024)})),
            )?),
            "PSYNC_S21",
        ),
    ])
}

/// The PSYNC code of an HTTP sync request with `authorization`.
async fn http_rejection(url: &str, authorization: Option<&str>) -> Result<(u16, String)> {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/sync/stream"))
        .json(&json!({"buckets": []}));
    if let Some(a) = authorization {
        request = request.header("Authorization", a);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status == 200 {
        // Accepted: the body is a sync stream that would not end.
        return Ok((status, String::new()));
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Ok((status, body["error"]["code"].as_str().unwrap_or("").to_string()))
}

/// The ERROR frame a WebSocket client gets for a SETUP with `authorization` in its metadata.
async fn ws_rejection(url: &str, authorization: Option<&str>) -> Result<(u32, u32, String)> {
    let mut client = WsClient::connect(url, "/sync/stream").await?;
    let metadata = match authorization {
        Some(a) => json!({"token": a, "user_agent": "abuse"}),
        None => json!({"user_agent": "abuse"}),
    };
    client
        .send(setup_frame("application/json", metadata.to_string().as_bytes()))
        .await?;
    first_error(&mut client).await
}

/// `(stream id, code, message)` of the first frame, which must be an ERROR.
async fn first_error(client: &mut WsClient) -> Result<(u32, u32, String)> {
    let frame = client.next_frame(T).await?.context("closed without an ERROR frame")?;
    let (code, message) = frame.error().with_context(|| format!("not an ERROR: {frame:?}"))?;
    Ok((frame.stream_id, code, message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_is_rejected_on_both_transports() -> Result<()> {
    let mut svc = Service::new().await?;
    let rsa = rsa_key(svc.dir.path())?;
    configure(svc.dir.path(), &rsa)?;
    let db = svc.source().await?;
    seed(&db, 1, 3, &["u1"]).await?;
    svc.start().await?;
    let url = svc.url();

    for (name, authorization, code) in token_cases(&rsa)? {
        let (status, got) = http_rejection(&url, authorization.as_deref()).await?;
        assert_eq!(status, 401, "HTTP, {name}: {got}");
        assert!(got.starts_with(code), "HTTP, {name}: {got} instead of {code}");
        let (stream_id, error_code, message) = ws_rejection(&url, authorization.as_deref()).await?;
        assert_eq!((stream_id, error_code), (0, REJECTED_SETUP), "WebSocket, {name}: {message}");
        assert!(message.starts_with(&format!("[{code}")), "WebSocket, {name}: {message}");
    }

    websocket_frame_abuse(&url).await?;
    raw_websocket_abuse(svc.port).await?;
    connection_flood(&url).await?;

    // Still serving, and nothing panicked.
    let mut stream = RawStream::open(&url, &token("u1"), json!({"buckets": []})).await?;
    let mut state = ClientState::default();
    stream.sync_until(&mut state, T, |_| true).await.with_context(|| svc.log())?;
    assert_eq!(client_todos(&state), source_todos(&db, "u1").await?);
    assert!(svc.alive(), "the service exited");
    assert!(!svc.log().contains("panicked"), "{}", svc.log());
    Ok(())
}

/// Malformed RSocket traffic over a well-formed WebSocket.
async fn websocket_frame_abuse(url: &str) -> Result<()> {
    let valid_metadata = json!({"token": format!("Token {}", token("u1"))}).to_string();
    // Garbage, a truncated frame and a text message where SETUP belongs.
    for first in [
        Message::Binary(b"\xde\xad\xbe\xef garbage".to_vec().into()),
        Message::Binary(vec![0, 0, 0].into()),
        Message::Text("{\"hello\":1}".into()),
    ] {
        let mut client = WsClient::connect(url, "/sync/stream").await?;
        client.send_message(first.clone()).await?;
        let (stream_id, _, message) = first_error(&mut client).await.with_context(|| format!("{first:?}"))?;
        assert_eq!(stream_id, 0, "{first:?}: {message}");
    }
    // A SETUP cut short inside its MIME types.
    let setup = setup_frame("application/json", valid_metadata.as_bytes());
    let mut client = WsClient::connect(url, "/sync/stream").await?;
    client.send(setup[..20].to_vec()).await?;
    first_error(&mut client).await?;
    // Unsupported MIME type.
    let mut client = WsClient::connect(url, "/sync/stream").await?;
    client.send(setup_frame("text/plain", valid_metadata.as_bytes())).await?;
    let (_, code, message) = first_error(&mut client).await?;
    assert_eq!(code, REJECTED_SETUP);
    assert!(message.starts_with("[PSYNC_S2004]"), "{message}");
    // Truncated BSON metadata.
    let metadata = bson::serialize_to_vec(&bson::doc! {"token": format!("Token {}", token("u1"))})?;
    let mut client = WsClient::connect(url, "/sync/stream").await?;
    client
        .send(setup_frame("application/bson", &metadata[..metadata.len() - 3]))
        .await?;
    let (_, code, message) = first_error(&mut client).await?;
    assert_eq!(code, REJECTED_SETUP);
    assert!(message.starts_with("[PSYNC_S2101]"), "{message}");

    // After a good SETUP: an unknown route, truncated BSON and a body that is not a request
    // each get an ERROR on their stream; the connection stays usable.
    let mut client = WsClient::connect(url, "/sync/stream").await?;
    client.send(setup_frame("application/bson", &metadata)).await?;
    let path = |p: &str| bson::serialize_to_vec(&bson::doc! {"path": p});
    let body = bson::serialize_to_vec(&bson::doc! {"buckets": []})?;
    let cases: [(u32, Vec<u8>, Vec<u8>, &str); 3] = [
        (1, path("/nope")?, body.clone(), "[PSYNC_S2002]"),
        (3, path("/sync/stream")?, body[..body.len() - 2].to_vec(), "[PSYNC_S2001]"),
        (
            5,
            path("/sync/stream")?,
            bson::serialize_to_vec(&bson::doc! {"buckets": 7})?,
            "[PSYNC_S2001]",
        ),
    ];
    for (stream_id, metadata, data, code) in cases {
        client.send(request_stream_frame(stream_id, 10, &metadata, &data)).await?;
        let (got_stream, error_code, message) = first_error(&mut client).await?;
        assert_eq!((got_stream, error_code), (stream_id, APPLICATION_ERROR), "{message}");
        assert!(message.starts_with(code), "{message} instead of {code}");
    }
    client.send(request_stream_frame(7, 10, &path("/sync/stream")?, &body)).await?;
    let line = client.next_line(T).await?;
    assert!(line.get("checkpoint").is_some(), "{line}");
    Ok(())
}

/// WebSocket framing violations, sent over a raw socket after a hand-made handshake.
async fn raw_websocket_abuse(port: u16) -> Result<()> {
    let cases: [(&str, Vec<u8>); 3] = [
        ("unmasked frame", vec![0x82, 0x03, 1, 2, 3]),
        (
            "frame length of 2^40",
            [vec![0x82, 0xFF], (1u64 << 40).to_be_bytes().to_vec(), vec![0; 4]].concat(),
        ),
        ("reserved opcode", vec![0x83, 0x80, 0, 0, 0, 0]),
    ];
    for (name, bytes) in cases {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.write_all(
            b"GET /sync/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(T, tcp.read_exact(&mut byte)).await??;
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        tcp.write_all(&bytes).await?;
        // The server closes: a close frame (0x88) and EOF, within the timeout.
        let mut rest = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut rest))
            .await
            .with_context(|| format!("{name}: connection left open"))??;
        assert_eq!(rest.first(), Some(&0x88), "{name}: {rest:?}");
    }
    Ok(())
}

/// Connects beyond `max_concurrent_connections`, on both transports, are refused with
/// PSYNC_S2304; a freed slot is usable again.
async fn connection_flood(url: &str) -> Result<()> {
    let mut held_http = Vec::new();
    let mut held_ws = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        if i % 2 == 0 {
            let mut s = RawStream::open(url, &token("u1"), json!({"buckets": []})).await?;
            s.next_line(T).await?;
            held_http.push(s);
        } else {
            let mut c = WsClient::sync(url, &token("u1"), 10, json!({"buckets": []})).await?;
            c.next_line(T).await?;
            held_ws.push(c);
        }
    }
    for _ in 0..10 {
        let (status, code) = http_rejection(url, Some(&format!("Token {}", token("u1")))).await?;
        assert_eq!((status, code.as_str()), (429, "PSYNC_S2304"));
        let (_, error_code, message) = ws_rejection(url, Some(&format!("Token {}", token("u1")))).await?;
        assert_eq!(error_code, REJECTED_SETUP);
        assert!(message.starts_with("[PSYNC_S2304]"), "{message}");
    }
    drop(held_ws.pop());
    // The slot frees once the server notices the close.
    let deadline = std::time::Instant::now() + T;
    loop {
        let mut c = WsClient::sync(url, &token("u1"), 10, json!({"buckets": []})).await?;
        match c.next_frame(T).await? {
            Some(f) if f.error().is_none() => break,
            _ if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("no slot freed: {other:?}"),
        }
    }
    Ok(())
}
