//! Decoder for pgoutput protocol version 1 messages (Relation, Insert, Update, Delete,
//! Truncate). Begin/Commit/logical messages are decoded by the transport crate.

use crate::error::SourceError;
use bytes::Bytes;

/// One column of a tuple, still as text: typing needs the relation's column types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    UnchangedToast,
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationMessage {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: u8,
    /// (flags, name, type oid); flag bit 1 = part of the key.
    pub columns: Vec<(u8, String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Relation(RelationMessage),
    Insert {
        relation: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is the key ('K') or full old row ('O') when the key changed or identity is FULL.
    Update {
        relation: u32,
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: u32,
        old: Vec<TupleValue>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Begin/Commit/Origin/Type/Message and anything else we do not act on here.
    Other(u8),
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn u8(&mut self) -> Result<u8, SourceError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| SourceError::decode("unexpected end of message"))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<Bytes, SourceError> {
        if self.pos + n > self.buf.len() {
            return Err(SourceError::decode("unexpected end of message"));
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, SourceError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, SourceError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstring(&mut self) -> Result<String, SourceError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| SourceError::decode("unterminated string"))?;
        let s = String::from_utf8(rest[..end].to_vec()).map_err(|_| SourceError::decode("invalid utf-8 in name"))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, SourceError> {
        let n = self.u16()? as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    TupleValue::Text(self.take(len)?)
                }
                other => return Err(SourceError::decode(format!("unsupported tuple column kind {:?}", other as char))),
            });
        }
        Ok(out)
    }
}

/// Decode one pgoutput message.
pub fn decode(data: Bytes) -> Result<PgOutputMessage, SourceError> {
    let mut r = Reader { buf: data, pos: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let oid = r.u32()?;
            let schema = r.cstring()?;
            let name = r.cstring()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                let col = r.cstring()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push((flags, col, type_oid));
            }
            PgOutputMessage::Relation(RelationMessage {
                oid,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            expect(r.u8()?, b'N')?;
            PgOutputMessage::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            expect(kind, b'N')?;
            PgOutputMessage::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(SourceError::decode("delete without key tuple"));
            }
            PgOutputMessage::Delete { relation, old: r.tuple()? }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _options = r.u8()?;
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            PgOutputMessage::Truncate { relations }
        }
        other => PgOutputMessage::Other(other),
    })
}

fn expect(got: u8, want: u8) -> Result<(), SourceError> {
    if got == want {
        Ok(())
    } else {
        Err(SourceError::decode(format!("expected {:?}, got {:?}", want as char, got as char)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_and_truncated_input() {
        let mut msg = vec![b'I', 0, 0, 0, 42, b'N', 0, 3, b'n', b'u', b't', 0, 0, 0, 2, b'h', b'i'];
        let decoded = decode(Bytes::from(msg.clone())).expect("valid");
        assert_eq!(
            decoded,
            PgOutputMessage::Insert {
                relation: 42,
                new: vec![
                    TupleValue::Null,
                    TupleValue::UnchangedToast,
                    TupleValue::Text(Bytes::from_static(b"hi"))
                ]
            }
        );
        msg.pop();
        assert!(decode(Bytes::from(msg)).is_err());
    }

    #[test]
    fn relation() {
        let mut msg = vec![b'R', 0, 0, 0, 7];
        msg.extend_from_slice(b"public\0todos\0");
        msg.push(b'd');
        msg.extend_from_slice(&[0, 1, 1]);
        msg.extend_from_slice(b"id\0");
        msg.extend_from_slice(&[0, 0, 0x0b, 0x86, 0xff, 0xff, 0xff, 0xff]);
        let PgOutputMessage::Relation(rel) = decode(Bytes::from(msg)).expect("valid") else {
            panic!("not a relation")
        };
        assert_eq!(rel.name, "todos");
        assert_eq!(rel.columns, vec![(1, "id".to_string(), 2950)]);
    }
}
