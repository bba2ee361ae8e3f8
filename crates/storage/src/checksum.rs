//! Per-op checksums (protocol spec §6.1): first 4 bytes of a SHA-256, little-endian.

use sha2::{Digest, Sha256};

fn hash(parts: &[&str]) -> u32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Checksum of a PUT of `data` (the exact JSON text sent to clients).
pub fn put(object_type: &str, object_id: &str, data: &str) -> u32 {
    hash(&["put.", object_type, ".", object_id, ".", data])
}

/// Checksum of a REMOVE: depends only on the source row identity.
pub fn remove(subkey: &str) -> u32 {
    hash(&["delete.", subkey])
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_reference_vector() {
        assert_eq!(super::put("test", "t1", r#"{"id":"t1","description":"Test 1"}"#), 920318466);
    }
}
