//! A JSON object's top-level members found without building them: capture keeps the few a
//! topic reads and steps over the rest (most of a resource). Stepping over with serde
//! (`IgnoredAny`) was a third of capture's instructions per row; this scanner checks the
//! same grammar a word at a time.
//!
//! It is strict: what it accepts, `serde_json` accepts. What it refuses (or a body that is
//! not an object, or keys with escapes) goes to the caller's serde path, which gives the
//! exact error; so a body that is not JSON is refused as before. `tests` compare both on
//! resources and on every one-byte change of them.

/// Nesting deeper than this goes to serde, whose limit (128) counts from where its parse
/// starts; no FHIR resource comes near it.
const MAX_DEPTH: usize = 100;

mod blocks;

/// A top-level member: its name as written (no escapes in it) and its value's text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member<'a> {
    pub(crate) key: &'a str,
    pub(crate) value: &'a str,
}

/// What is known of a text before it is scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Anything: every value is checked against JSON's grammar.
    Unchecked,
    /// Postgres's text output of a `jsonb` value, which Postgres checked when it stored it:
    /// the values no one reads are stepped over by their brackets and quotes alone,
    /// without checking their grammar again (that check was half of capture's parsing).
    /// The members kept are still parsed by serde, and the top level is still checked.
    Jsonb,
}

/// The members of the JSON object `text` whose names `keep` accepts, in order; `None` when
/// `text` is not valid JSON, not an object, or has a member name with escapes (the caller
/// then reads it with serde).
pub(crate) fn members<'a>(
    text: &'a [u8],
    source: Source,
    keep: impl Fn(&str) -> bool,
) -> Option<Vec<Member<'a>>> {
    // Once the whole text is UTF-8, every slice between ASCII delimiters is too.
    let text = std::str::from_utf8(text).ok()?;
    let mut s = Scanner {
        b: text.as_bytes(),
        i: 0,
        // Compact JSON (jsonb's text form) has no byte below 0x20 at all: its strings are
        // then scanned for `"` and `\` alone, with SIMD. Postgres prints a jsonb with
        // spaces between tokens and escapes every control character in its strings, so its
        // text is not searched for them (a pass over the whole body).
        controls: source == Source::Unchecked && has_controls(text.as_bytes()),
    };
    let mut out = Vec::new();
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.eat(b'"')?;
            let start = s.i;
            if s.string()? {
                return None;
            }
            let key = &text[start..s.i - 1];
            s.ws();
            s.eat(b':')?;
            s.ws();
            let at = s.i;
            match source {
                Source::Unchecked => s.value()?,
                Source::Jsonb => s.skip()?,
            }
            if keep(key) {
                out.push(Member {
                    key,
                    value: &text[at..s.i],
                });
            }
            s.ws();
            match s.next()? {
                b',' => s.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    (s.i == s.b.len()).then_some(out)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The eight bytes at `i` as a word (the caller checked they exist).
fn word(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Whether any byte is below 0x20, eight at a time.
fn has_controls(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let mut acc = 0u64;
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        let x = u64::from_le_bytes(a);
        acc |= x.wrapping_sub(ONES * 0x20) & !x;
    }
    acc & HIGH != 0 || words.remainder().iter().any(|&c| c < 0x20)
}

/// Where the run of string bytes from `i` that need no escaping ends: at the first `"`,
/// `\\` or (with `controls`) byte below 0x20, eight bytes at a time where it can.
fn run_end(b: &[u8], mut i: usize, controls: bool) -> usize {
    let low = if controls { ONES * 0x20 } else { 0 };
    while i + 8 <= b.len() {
        let x = word(b, i);
        // A byte is zero in `q`/`s` where it was `"`/`\\`; `x - 0x20..` borrows where a
        // byte is below 0x20. Bytes of 0x80 and up (UTF-8) are excluded from the test. Only
        // the lowest flagged byte is certain (a borrow may flag bytes above it): it is the
        // first, as the word is little-endian.
        let q = x ^ (ONES * u64::from(b'"'));
        let s = x ^ (ONES * u64::from(b'\\'));
        let special = ((q.wrapping_sub(ONES) & !q)
            | (s.wrapping_sub(ONES) & !s)
            | (x.wrapping_sub(low) & !x))
            & HIGH;
        if special != 0 {
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && !(b[i] == b'"' || b[i] == b'\\' || (controls && b[i] < 0x20)) {
        i += 1;
    }
    i
}

/// Where the bytes of `s` from `from` that a JSON string holds as they are end.
pub(crate) fn plain_end(s: &[u8], from: usize) -> usize {
    run_end(s, from, true)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// The text has bytes below 0x20 (whitespace, or a string's illegal control character).
    controls: bool,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// One value, nested ones kept on a stack of bits (1: object) rather than by recursion.
    fn value(&mut self) -> Option<()> {
        let mut stack: u128 = 0;
        let mut depth = 0usize;
        loop {
            // A value.
            match self.next()? {
                b'"' => {
                    self.string()?;
                }
                c @ (b'{' | b'[') => {
                    depth += 1;
                    if depth >= MAX_DEPTH {
                        return None;
                    }
                    let object = c == b'{';
                    stack = (stack << 1) | u128::from(object);
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        depth -= 1;
                        stack >>= 1;
                    } else {
                        if object {
                            self.member_name()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                c @ (b'-' | b'0'..=b'9') => self.number(c)?,
                _ => return None,
            }
            // After a value: close what ends here, or go on to the next item.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match (self.next()?, object) {
                    (b',', _) => {
                        self.ws();
                        if object {
                            self.member_name()?;
                        }
                        break;
                    }
                    (b'}', true) | (b']', false) => {
                        depth -= 1;
                        stack >>= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    /// One value of checked JSON ([`Source::Jsonb`]), stepped over by its brackets and
    /// quotes: nothing in it is checked, as Postgres did that.
    fn skip(&mut self) -> Option<()> {
        match self.next()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                // `None` only when the text ends inside it: then serde words the error.
                self.i = blocks::container_end(self.b, self.i)?;
                Some(())
            }
            // A number or a literal: up to what may follow a value.
            _ => {
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                        break;
                    }
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// The rest of a checked string after its opening quote, through the closing one.
    fn skip_string(&mut self) -> Option<()> {
        loop {
            self.i = run_end(self.b, self.i, false);
            if self.next()? == b'"' {
                return Some(());
            }
            // A backslash: the escaped byte cannot end the string.
            self.next()?;
        }
    }

    /// A member's name and colon inside a nested object, up to its value.
    fn member_name(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.i + rest.len();
        (self.b.get(self.i..end)? == rest).then(|| self.i = end)
    }

    /// The rest of a number whose first byte was `first` (JSON's grammar exactly).
    fn number(&mut self, first: u8) -> Option<()> {
        let first = if first == b'-' { self.next()? } else { first };
        match first {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let at = self.i;
        self.digits();
        (self.i > at).then_some(())
    }

    /// The rest of a string after its opening quote, through the closing one; whether it
    /// had escapes. Control characters are refused, as JSON requires.
    fn string(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            self.plain_run();
            match self.next()? {
                b'"' => return Some(escaped),
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                _ => return None,
            }
        }
    }

    /// Steps over string bytes that need no attention (not `"`, `\\` or a control
    /// character); without control bytes in the text only `"` and `\\` end a run.
    fn plain_run(&mut self) {
        self.i = run_end(self.b, self.i, self.controls);
    }

    /// An escape after its backslash. `\u` takes four hex digits; serde refuses a lone
    /// surrogate only when it builds the string, so neither does this.
    fn escape(&mut self) -> Option<()> {
        match self.next()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => {
                let hex = self.b.get(self.i..self.i + 4)?;
                self.i += 4;
                hex.iter().all(u8::is_ascii_hexdigit).then_some(())
            }
            _ => None,
        }
    }
}

/// Postgres's text form of a jsonb value, for the tests (shared with the integration tests
/// and the capture benchmark).
#[cfg(test)]
#[path = "../../tests/support/jsonb_text.rs"]
mod jsonb;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IgnoredAny;
    use serde_json::Value;

    fn corpus() -> Vec<String> {
        let mut out: Vec<String> = vec![
            r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2339-0","display":"Glucose \"fasting\" é 😀"}],"text":"G\u00e9"},"subject":{"id":"p1","resourceType":"Patient"},"value":{"Quantity":{"value":-180.5e-1,"unit":"mg/dL"}},"flags":[true,false,null,0,1.0,2E+3,[],{},[[{}]]],"note":[{"text":"a\\b\/c\n\t"}]}"#.into(),
            r#"  {  "a" : [ 1 , { "b" : [ ] } ] , "c":{"d":{"e":"f"}}  }  "#.into(),
            "{}".into(),
            r#"{"only":"x"}"#.into(),
        ];
        let nested = format!("{{\"deep\":{}1{}}}", "[".repeat(99), "]".repeat(99));
        out.push(nested);
        out
    }

    /// What serde makes of it: whether it is valid JSON, and the kept members' values.
    fn serde_view(text: &[u8], keep: &dyn Fn(&str) -> bool) -> Option<Vec<(String, Value)>> {
        serde_json::from_slice::<IgnoredAny>(text).ok()?;
        let Value::Object(m) = serde_json::from_slice::<Value>(text).ok()? else {
            return None;
        };
        Some(m.into_iter().filter(|(k, _)| keep(k)).collect())
    }

    fn scan_view(text: &[u8], keep: &dyn Fn(&str) -> bool) -> Option<Vec<(String, Value)>> {
        let members = members(text, Source::Unchecked, keep)?;
        // A repeated name: the last one wins, as in serde's map.
        let out: std::collections::BTreeMap<String, Value> = members
            .into_iter()
            .map(|m| {
                (
                    m.key.to_string(),
                    serde_json::from_str(m.value).expect("kept value parses"),
                )
            })
            .collect();
        Some(out.into_iter().collect())
    }

    fn keep(k: &str) -> bool {
        matches!(k, "code" | "subject" | "value" | "a" | "deep" | "only")
    }

    #[test]
    fn finds_what_serde_finds() {
        for text in corpus() {
            let got = scan_view(text.as_bytes(), &keep);
            assert!(got.is_some(), "refused valid JSON: {text}");
            assert_eq!(got, serde_view(text.as_bytes(), &keep), "{text}");
        }
    }

    /// Every one-byte change of the corpus: whatever the scanner accepts, serde accepts with
    /// the same members. It may refuse more (its caller then asks serde); count that it
    /// rarely does, so the fast path is the common one.
    #[test]
    fn accepts_nothing_serde_refuses() {
        let swaps = b" \"\\{}[]:,0-1e.tnu\x01\x1f\x7fa/";
        let (mut tried, mut accepted, mut refused_valid) = (0, 0, 0);
        for text in corpus() {
            let b = text.as_bytes();
            for i in 0..b.len() {
                let mut variants = vec![[&b[..i], &b[i + 1..]].concat()];
                for &c in swaps {
                    let mut v = b.to_vec();
                    v[i] = c;
                    variants.push(v);
                }
                for v in variants {
                    tried += 1;
                    let serde = serde_view(&v, &keep);
                    match scan_view(&v, &keep) {
                        Some(got) => {
                            accepted += 1;
                            let want = serde.unwrap_or_else(|| {
                                panic!(
                                    "accepted what serde refuses: {}",
                                    String::from_utf8_lossy(&v)
                                )
                            });
                            let mut want = want;
                            want.sort_by(|a, b| a.0.cmp(&b.0));
                            assert_eq!(got, want, "{}", String::from_utf8_lossy(&v));
                        }
                        None if serde.is_some() => refused_valid += 1,
                        None => {}
                    }
                }
            }
        }
        assert!(accepted > 1000, "{accepted} of {tried} accepted");
        // Keys with escapes and a duplicate-free object are all serde takes that this refuses.
        assert!(
            refused_valid * 50 < accepted,
            "{refused_valid} valid ones refused"
        );
    }

    fn members_unchecked<'a>(text: &'a [u8], keep: fn(&str) -> bool) -> Option<Vec<Member<'a>>> {
        members(text, Source::Unchecked, keep)
    }

    use super::jsonb::jsonb_text;

    fn pairs(m: Vec<Member<'_>>) -> Vec<(&str, &str)> {
        m.into_iter().map(|m| (m.key, m.value)).collect()
    }

    /// On valid JSON, stepping over by brackets and quotes finds the members that checking
    /// every value finds: the corpus as written, in jsonb's layout, and every one-byte change
    /// of them that is still valid JSON (escapes, brackets and quotes inside strings).
    #[test]
    fn jsonb_skip_finds_what_the_checked_scan_finds() {
        let mut texts = corpus();
        for t in corpus() {
            let v: Value = serde_json::from_str(&t).expect("corpus is JSON");
            texts.push(jsonb_text(&v));
        }
        texts.push(
            r#"{"a": "x{[\"]}", "b": ["}", {"c": "]\\"}], "code": [1, -2.5e3, true, null]}"#.into(),
        );
        let (mut compared, mut kept) = (0, 0);
        for text in &texts {
            let b = text.as_bytes();
            let mut variants = vec![b.to_vec()];
            for i in 0..b.len() {
                for &c in b"\"{}[]\\ ,:" {
                    let mut v = b.to_vec();
                    v[i] = c;
                    variants.push(v);
                }
            }
            for v in variants {
                if serde_view(&v, &keep).is_none() {
                    continue;
                }
                let checked = members(&v, Source::Unchecked, keep);
                let Some(checked) = checked else { continue };
                let skipped = members(&v, Source::Jsonb, keep)
                    .unwrap_or_else(|| panic!("refused: {}", String::from_utf8_lossy(&v)));
                kept += checked.len();
                assert_eq!(
                    pairs(skipped),
                    pairs(checked),
                    "{}",
                    String::from_utf8_lossy(&v)
                );
                compared += 1;
            }
        }
        assert!(
            compared > 500 && kept > 500,
            "{compared} texts, {kept} members compared"
        );
    }

    /// Quotes, backslash runs and brackets at every offset from a 64-byte block's edge.
    #[test]
    fn jsonb_blocks_carry_strings_and_escapes_across_their_edges() {
        let pieces = [
            r#""a\\\"b""#,
            r#""\\""#,
            r#""x\"]}{[""#,
            r#"{"c": [1, {"d": "}"}]}"#,
            r#""\u005c""#,
        ];
        let mut compared = 0;
        for pad in 0..140 {
            for piece in pieces {
                let text = format!(
                    r#"{{"a": ["{}", {piece}, {piece}], "code": {{"b": [{piece}]}}, "value": 1}}"#,
                    "p".repeat(pad)
                );
                serde_json::from_str::<Value>(&text).expect("test text is JSON");
                let checked = members(text.as_bytes(), Source::Unchecked, keep).expect("checked");
                let skipped = members(text.as_bytes(), Source::Jsonb, keep).expect("skipped");
                assert_eq!(pairs(skipped), pairs(checked), "{text}");
                compared += 1;
            }
        }
        assert_eq!(compared, 140 * pieces.len());
    }

    #[test]
    fn escaped_names_and_other_tops_go_to_serde() {
        assert!(members_unchecked(br#"{"co\u0064e": 1}"#, keep).is_none());
        assert!(members_unchecked(b"[1, 2]", keep).is_none());
        assert!(members_unchecked(b"\"text\"", keep).is_none());
        assert!(members_unchecked(b"{\"a\": 1} x", keep).is_none());
        assert!(members_unchecked(b"{\"a\": \xff}", keep).is_none());
        let too_deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(members_unchecked(too_deep.as_bytes(), keep).is_none());
    }
}
