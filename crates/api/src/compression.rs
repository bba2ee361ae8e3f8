//! `Content-Encoding` of `/sync/stream` (protocol spec §2.2 item 5): zstd or gzip, negotiated
//! from `Accept-Encoding` (zstd preferred), each chunk decodable as soon as it arrives.
//!
//! A held stream must not keep a compressor (zlib's state is ~256 KiB, zstd's more), so every
//! chunk is compressed on its own with a compressor borrowed from the worker thread:
//! - zstd: each chunk is a complete frame; a stream of concatenated frames is valid zstd.
//! - gzip: one member for the whole response, whose deflate data is a run of independently
//!   compressed segments, each ending in a sync flush (byte-aligned, nothing referring back
//!   into an earlier chunk). The stream keeps only the running CRC-32 and length for the
//!   trailer. (Not one member per chunk: not every gzip decoder reads past the first member.)
//!
//! Compression pays where it matters, on downloads, which come in chunks of ~64 KiB. Small
//! chunks (keepalives, a fan-out checkpoint's few lines) would save a few hundred bytes at most,
//! while a deflate pass starts by clearing ~160 KiB of hash tables (~10 µs: a second of CPU per
//! 100,000 small chunks), so gzip stores chunks under [`MIN_DEFLATE`] as they are. zstd's setup
//! is cheap: it compresses everything, and stores by itself what does not shrink.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Crc, FlushCompress};
use futures::Stream;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// zstd level: 1 is the fastest standard level, and already well ahead of gzip's ratio here.
const ZSTD_LEVEL: i32 = 1;
/// Chunks shorter than this are stored, not deflated.
const MIN_DEFLATE: usize = 1024;
/// gzip member header: magic, deflate, no flags, no mtime, no extra flags, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// The last deflate block: empty, stored, final.
const DEFLATE_END: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

thread_local! {
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Gzip,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }

    /// The encoding to answer `Accept-Encoding` with: the acceptable one with the highest
    /// q-value, zstd on a tie; `None` for identity.
    pub fn negotiate(accept_encoding: Option<&str>) -> Option<Encoding> {
        let header = accept_encoding?;
        let q = |names: &[&str]| {
            header
                .split(',')
                .filter_map(|part| {
                    let mut pieces = part.split(';').map(str::trim);
                    let token = pieces.next()?;
                    names
                        .iter()
                        .any(|n| token.eq_ignore_ascii_case(n))
                        .then(|| pieces.find_map(|p| p.strip_prefix("q=")?.parse::<f32>().ok()).unwrap_or(1.0))
                })
                .fold(None, |best: Option<f32>, q| Some(best.map_or(q, |b| b.max(q))))
        };
        let any = q(&["*"]).unwrap_or(0.0);
        let zstd = q(&["zstd"]).unwrap_or(any);
        let gzip = q(&["gzip", "x-gzip"]).unwrap_or(any);
        match (zstd, gzip) {
            (z, g) if z > 0.0 && z >= g => Some(Encoding::Zstd),
            (_, g) if g > 0.0 => Some(Encoding::Gzip),
            _ => None,
        }
    }
}

/// The chunks of `inner`, encoded; an encoding failure (out of memory) ends the body with an
/// error, as the stream cannot go on uncompressed.
pub struct Encoded<S> {
    inner: S,
    encoding: Encoding,
    gzip: GzipMember,
    done: bool,
}

impl<S> Encoded<S> {
    pub fn new(inner: S, encoding: Encoding) -> Self {
        Encoded {
            inner,
            encoding,
            gzip: GzipMember::default(),
            done: false,
        }
    }
}

impl<S: Stream<Item = Bytes> + Unpin> Stream for Encoded<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let encoded = match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(chunk)) => match this.encoding {
                Encoding::Zstd => zstd_frame(&chunk),
                Encoding::Gzip => this.gzip.segment(&chunk),
            },
            Poll::Ready(None) => {
                this.done = true;
                match this.encoding {
                    Encoding::Zstd => return Poll::Ready(None),
                    Encoding::Gzip => Ok(this.gzip.trailer()),
                }
            }
        };
        if encoded.is_err() {
            this.done = true;
        }
        Poll::Ready(Some(encoded))
    }
}

/// What a gzip response keeps between chunks: whether the header went out, and the CRC-32 and
/// length of everything so far for the trailer.
#[derive(Default)]
struct GzipMember {
    started: bool,
    crc: Crc,
}

impl GzipMember {
    /// The next part of the member: `chunk` as deflate data that ends byte-aligned and refers
    /// to nothing before it.
    fn segment(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        let mut out = BytesMut::with_capacity(chunk.len() / 2 + 64);
        if !self.started {
            self.started = true;
            out.put_slice(&GZIP_HEADER);
        }
        self.crc.update(chunk);
        if chunk.len() < MIN_DEFLATE {
            // A stored block: 3 header bits (not final, stored) padded to a byte, LEN, NLEN.
            let len = chunk.len() as u16;
            out.put_u8(0);
            out.put_u16_le(len);
            out.put_u16_le(!len);
            out.put_slice(chunk);
            return Ok(out.freeze());
        }
        let mut deflated = Vec::new();
        DEFLATE.with(|c| deflate_segment(&mut c.borrow_mut(), chunk, &mut deflated))?;
        out.put_slice(&deflated);
        Ok(out.freeze())
    }

    /// Ends the member: the final block, then CRC-32 and length mod 2^32.
    fn trailer(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(GZIP_HEADER.len() + DEFLATE_END.len() + 8);
        if !self.started {
            out.put_slice(&GZIP_HEADER);
        }
        out.put_slice(&DEFLATE_END);
        out.put_u32_le(self.crc.sum());
        out.put_u32_le(self.crc.amount());
        out.freeze()
    }
}

/// Deflate `input` with a fresh dictionary and a sync flush.
fn deflate_segment(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    c.reset();
    loop {
        out.reserve(input.len() / 4 + 64);
        let consumed = c.total_in() as usize;
        c.compress_vec(&input[consumed..], out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // The flush is complete once all input is in and the output did not fill up.
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

/// `chunk` as one complete zstd frame.
fn zstd_frame(chunk: &[u8]) -> io::Result<Bytes> {
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(chunk).map(Bytes::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::io::Read;

    fn encode_all(encoding: Encoding, chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let inner = futures::stream::iter(chunks.iter().cloned().map(Bytes::from));
        let encoded: Vec<io::Result<Bytes>> = futures::executor::block_on(Encoded::new(inner, encoding).collect());
        encoded.into_iter().map(|r| r.expect("encodes").to_vec()).collect()
    }

    /// NDJSON-like chunks: tiny, mid-sized and large, compressible and not.
    fn sample_chunks() -> Vec<Vec<u8>> {
        let line = |i: usize| format!("{{\"data\":{{\"op_id\":\"{i}\",\"object_id\":\"{:x}\"}}}}\n", i * 2_654_435_761);
        vec![
            b"{\"token_expires_in\":20}\n".to_vec(),
            (0..3000).map(line).collect::<String>().into_bytes(),
            (0..5).map(line).collect::<String>().into_bytes(),
            (0..70_000u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect(),
            b"{\"checkpoint_complete\":{\"last_op_id\":\"9\"}}\n".to_vec(),
        ]
    }

    #[test]
    fn gzip_is_one_member_whose_every_prefix_of_chunks_decodes_at_once() {
        let chunks = sample_chunks();
        let encoded = encode_all(Encoding::Gzip, &chunks);
        assert_eq!(encoded.len(), chunks.len() + 1, "one part per chunk, then the trailer");
        // A streaming decoder gets all data of the chunks received so far (nothing held back
        // for a later chunk), as a client reading lines as they come needs.
        let mut wire = Vec::new();
        for (n, part) in encoded[..chunks.len()].iter().enumerate() {
            wire.extend_from_slice(part);
            let mut decoder = flate2::read::DeflateDecoder::new(&wire[GZIP_HEADER.len()..]);
            let mut got = Vec::new();
            let _ = decoder.read_to_end(&mut got);
            assert_eq!(got, chunks[..=n].concat(), "after {} chunks", n + 1);
        }
        wire.extend_from_slice(&encoded[chunks.len()]);
        // The whole response is one valid member (CRC and length checked).
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(&wire[..]).read_to_end(&mut got).expect("valid gzip");
        assert_eq!(got, chunks.concat());
        // Lines compress (to well under half); random bytes stay about as they are.
        let lines = chunks[1].len();
        assert!(
            wire.len() < got.len() - lines / 2,
            "compressed: {} of {} bytes",
            wire.len(),
            got.len()
        );
    }

    #[test]
    fn zstd_is_a_frame_per_chunk() {
        let chunks = sample_chunks();
        let encoded = encode_all(Encoding::Zstd, &chunks);
        assert_eq!(encoded.len(), chunks.len());
        for (part, chunk) in encoded.iter().zip(&chunks) {
            assert_eq!(&zstd::bulk::decompress(part, chunk.len()).expect("a complete frame"), chunk);
        }
        let wire = encoded.concat();
        let mut got = Vec::new();
        zstd::stream::read::Decoder::new(&wire[..])
            .expect("decoder")
            .read_to_end(&mut got)
            .expect("concatenated frames are one valid stream");
        assert_eq!(got, chunks.concat());
    }

    #[test]
    fn an_empty_gzip_response_is_still_valid() {
        let encoded = encode_all(Encoding::Gzip, &[]);
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(&encoded.concat()[..])
            .read_to_end(&mut got)
            .expect("valid gzip");
        assert!(got.is_empty());
    }

    #[test]
    fn negotiation_prefers_zstd_and_honours_q_values() {
        let n = |h| Encoding::negotiate(Some(h));
        assert_eq!(n("gzip, deflate"), Some(Encoding::Gzip), "what the JS SDK sends");
        assert_eq!(n("gzip, deflate, br, zstd"), Some(Encoding::Zstd));
        assert_eq!(n("zstd;q=0.5, gzip"), Some(Encoding::Gzip));
        assert_eq!(n("GZIP;q=0.2, zstd;q=0.2"), Some(Encoding::Zstd));
        assert_eq!(n("*"), Some(Encoding::Zstd));
        assert_eq!(n("*;q=0.5, zstd;q=0"), Some(Encoding::Gzip));
        assert_eq!(n("gzip;q=0, identity"), None);
        assert_eq!(n("deflate, br"), None);
        assert_eq!(n(""), None);
        assert_eq!(Encoding::negotiate(None), None);
    }
}
