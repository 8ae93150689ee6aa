//! Raw PNG pieces for hostile-input tests: chunk CRCs, chunks, and zlib streams that inflate
//! far beyond their size.

/// CRC-32 (IEEE, as PNG chunks use it) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG chunk: length, `kind`, `payload`, CRC.
pub fn chunk(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut body = kind.to_vec();
    body.extend_from_slice(payload);
    let len = u32::try_from(payload.len()).expect("a chunk under 4 GiB");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A zlib stream that inflates to `n` zero bytes, `n = 1 + 258 k`: one fixed-Huffman block
/// with a literal 0 and then `k` copies of (length 258, distance 1), 13 bits per 258 bytes.
pub fn zlib_zeros(n: usize) -> Vec<u8> {
    assert_eq!((n - 1) % 258, 0, "n = 1 + 258 k");
    let mut out = vec![0x78, 0x01];
    let (mut acc, mut len) = (0u64, 0u32);
    let mut put = |out: &mut Vec<u8>, v: u32, n: u32| {
        acc |= u64::from(v) << len;
        len += n;
        while len >= 8 {
            out.push(acc.to_le_bytes()[0]);
            acc >>= 8;
            len -= 8;
        }
    };
    // Huffman codes go most significant bit first.
    let code = |c: u32, n: u32| c.reverse_bits() >> (32 - n);
    put(&mut out, 1, 1); // final block
    put(&mut out, 1, 2); // fixed Huffman codes
    put(&mut out, code(0x30, 8), 8); // literal 0
    for _ in 0..(n - 1) / 258 {
        put(&mut out, code(0xC5, 8), 8); // length code 285: 258
        put(&mut out, 0, 5); // distance code 0: 1
    }
    put(&mut out, 0, 7); // end of block
    put(&mut out, 0, 7); // flush the last bits
    let adler = (((n % 65521) as u32) << 16) | 1;
    out.extend_from_slice(&adler.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32_matches_the_png_iend_chunk() {
        // Every PNG ends with this chunk; its CRC is fixed.
        assert_eq!(super::chunk(b"IEND", &[])[8..], [0xAE, 0x42, 0x60, 0x82]);
    }

    #[test]
    fn zlib_zeros_has_the_size_it_claims() {
        let z = super::zlib_zeros(1 + 258 * 1000);
        // 13 bits per 258 bytes: about 1.6 KB for 258 KB.
        assert!(z.len() < 1700, "{}", z.len());
        assert_eq!(z[..2], [0x78, 0x01]);
    }
}
