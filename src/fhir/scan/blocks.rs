//! Stepping over a checked container 64 bytes at a time, with masks of its quotes,
//! backslashes and brackets (the technique of simdjson's stage 1): a byte is inside a string
//! when an odd number of unescaped quotes precede it, and the brackets outside strings are
//! counted a block at a time. A byte-at-a-time walk paid per string, and FHIR JSON is
//! mostly short strings.

use wide::u8x16;

/// The end (one past the closing bracket) of the container whose contents start at `i`,
/// in checked JSON; `None` when the text ends first.
pub(super) fn container_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth: u32 = 1;
    // All ones when the block starts inside a string.
    let mut inside_carry = 0u64;
    // Whether the block's first byte is escaped by a backslash ending the one before.
    let mut escape_carry = 0u64;
    while i < b.len() {
        let m = Masks::of(&block(b, i));
        let quotes = m.quote & !escaped(m.backslash, &mut escape_carry);
        let inside = prefix_xor(quotes) ^ inside_carry;
        let (open, close) = (m.open & !inside, m.close & !inside);
        if close.count_ones() >= depth {
            let mut all = open | close;
            while all != 0 {
                let at = all.trailing_zeros();
                all &= all - 1;
                if open >> at & 1 == 1 {
                    depth += 1;
                } else {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + at as usize + 1);
                    }
                }
            }
        } else {
            depth = depth + open.count_ones() - close.count_ones();
        }
        inside_carry = ((inside as i64) >> 63) as u64;
        i += 64;
    }
    None
}

/// The 64 bytes at `i`, padded with spaces past the end.
fn block(b: &[u8], i: usize) -> [u8; 64] {
    match b.get(i..i + 64).and_then(|s| <[u8; 64]>::try_from(s).ok()) {
        Some(full) => full,
        None => {
            let mut out = [b' '; 64];
            let rest = b.get(i..).unwrap_or_default();
            out[..rest.len()].copy_from_slice(rest);
            out
        }
    }
}

/// A bit per byte of a block, lowest bit first.
struct Masks {
    quote: u64,
    backslash: u64,
    /// `{` or `[`.
    open: u64,
    /// `}` or `]`.
    close: u64,
}

impl Masks {
    fn of(block: &[u8; 64]) -> Masks {
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            open: 0,
            close: 0,
        };
        for (k, chunk) in block.chunks_exact(16).enumerate() {
            let mut a = [0u8; 16];
            a.copy_from_slice(chunk);
            let v = u8x16::from(a);
            // `[`/`]` differ from `{`/`}` only in the 0x20 bit, and no other byte becomes
            // `{` or `}` with it set.
            let folded = v | u8x16::splat(0x20);
            let bits = |x: u8x16| u64::from(x.to_bitmask()) << (16 * k);
            m.quote |= bits(v.simd_eq(u8x16::splat(b'"')));
            m.backslash |= bits(v.simd_eq(u8x16::splat(b'\\')));
            m.open |= bits(folded.simd_eq(u8x16::splat(b'{')));
            m.close |= bits(folded.simd_eq(u8x16::splat(b'}')));
        }
        m
    }
}

/// The bytes a backslash escapes (the byte after each backslash that is not itself
/// escaped); `carry` brings an escape across the block boundary.
fn escaped(backslash: u64, carry: &mut u64) -> u64 {
    let mut escaped = *carry;
    *carry = 0;
    let mut rest = backslash;
    while rest != 0 {
        let at = rest.trailing_zeros();
        rest &= rest - 1;
        if escaped >> at & 1 == 1 {
            continue;
        }
        if at == 63 {
            *carry = 1;
        } else {
            escaped |= 1 << (at + 1);
        }
    }
    escaped
}

/// Bit `i` is the XOR of bits `0..=i`: set from an opening quote up to its closing one.
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}
