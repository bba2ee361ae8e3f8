//! Response compression as a client sees it: what to ask for in `Accept-Encoding`, and
//! decoding a compressed body as its chunks arrive.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::io::Write;

/// The `Accept-Encoding` a download asks with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// No `Accept-Encoding` header.
    Identity,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn accept_encoding(self) -> Option<&'static str> {
        match self {
            Compression::Identity => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }
}

/// A streaming decoder for a response's `Content-Encoding`.
pub enum BodyDecoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl BodyDecoder {
    /// The decoder for a `Content-Encoding` value; `None` for an identity body.
    pub fn for_content_encoding(value: Option<&str>) -> Result<Option<BodyDecoder>> {
        Ok(match value.map(str::trim) {
            None | Some("") | Some("identity") => None,
            Some("gzip") => Some(BodyDecoder::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
            Some("zstd") => Some(BodyDecoder::Zstd(
                zstd::stream::write::Decoder::new(Vec::new()).context("zstd decoder")?,
            )),
            Some(other) => bail!("unsupported Content-Encoding {other:?}"),
        })
    }

    /// Everything `chunk` decodes to (the service makes every chunk decodable on arrival).
    pub fn decode(&mut self, chunk: &[u8]) -> Result<Vec<u8>> {
        let out = match self {
            BodyDecoder::Gzip(d) => {
                d.write_all(chunk).context("gzip body")?;
                d.flush().context("gzip body")?;
                d.get_mut()
            }
            BodyDecoder::Zstd(d) => {
                d.write_all(chunk).context("zstd body")?;
                d.flush().context("zstd body")?;
                d.get_mut()
            }
        };
        Ok(std::mem::take(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_concatenated_zstd_frames_chunk_by_chunk() {
        let mut decoder = BodyDecoder::for_content_encoding(Some("zstd"))
            .expect("decoder")
            .expect("not identity");
        for part in [&b"first line\n"[..], b"second line\n"] {
            let frame = zstd::bulk::compress(part, 1).expect("compress");
            assert_eq!(decoder.decode(&frame).expect("decode"), part);
        }
        assert!(BodyDecoder::for_content_encoding(None).expect("identity").is_none());
        assert!(BodyDecoder::for_content_encoding(Some("br")).is_err());
    }
}
