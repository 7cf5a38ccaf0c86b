//! Secret masking for step logs: replaces every occurrence of a pipeline's secret values
//! in a byte stream with `***`, including occurrences split across chunk boundaries.
//! It sits between a step's output pipes and its log file (and can mask whole texts such
//! as API output or daemon log fields). Pure byte processing: no I/O, no UTF-8
//! assumptions, no knowledge of where the values came from.

/// Values shorter than this many bytes are never masked: they are too short to be secret,
/// and masking e.g. `1` or `on` would make every log unreadable. For a multi-line value the
/// same limit applies to each (whitespace-trimmed) line that is masked on its own.
pub const MIN_SECRET_LEN: usize = 4;

const STARS: &[u8] = b"***";

/// A streaming masker. Matching is greedy from left to right; at each position the longest
/// matching pattern wins, so the result never depends on how the input was chunked.
#[derive(Debug, Clone)]
pub struct Masker {
    /// Distinct patterns, longest first (the order decides which one wins at a position).
    patterns: Vec<Vec<u8>>,
    /// `first[b]`: some pattern starts with byte `b`; lets most bytes skip the pattern loop.
    first: [bool; 256],
    /// Bytes that may still be the start of a secret, waiting for the next chunk.
    carry: Vec<u8>,
}

impl Masker {
    /// `values`: the secret values. Empty or too-short values are ignored.
    pub fn new<I, S>(values: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut patterns = Vec::new();
        for value in values {
            add_patterns(value.as_ref(), &mut patterns);
        }
        // Longest first; ties by content only to make the order (and dedup) deterministic.
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        let mut first = [false; 256];
        for p in &patterns {
            first[usize::from(p[0])] = true;
        }
        Masker {
            patterns,
            first,
            carry: Vec::new(),
        }
    }

    /// Whether there is anything to mask (when false, callers may bypass it).
    pub fn is_active(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Feeds a chunk; returns the bytes that are now safe to write (masked). Bytes that
    /// could still be the start of a secret are held back (at most longest_secret - 1 bytes).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.carry.is_empty() {
            let (out, done) = self.scan(chunk, false);
            self.carry.extend_from_slice(&chunk[done..]);
            return out;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let (out, done) = self.scan(&buf, false);
        buf.drain(..done);
        self.carry = buf;
        out
    }

    /// End of stream: the held-back tail, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let tail = std::mem::take(&mut self.carry);
        self.scan(&tail, true).0
    }

    /// Convenience for whole texts (API output, daemon log fields): masks `text` in one go.
    pub fn mask_all(&self, text: &[u8]) -> Vec<u8> {
        self.scan(text, true).0
    }

    /// Masks `buf` from the start. Returns the output and how many input bytes it covers.
    /// Unless `at_end`, scanning stops at the first position where a pattern could match
    /// but runs past the end of `buf`: only more input can decide it (and whether a longer
    /// pattern beats a shorter one that already matches there). The rest is the caller's
    /// carry; it is shorter than that pattern, hence shorter than the longest one.
    fn scan(&self, buf: &[u8], at_end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'outer: while i < buf.len() {
            if !self.first[usize::from(buf[i])] {
                out.push(buf[i]);
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            for p in &self.patterns {
                if rest.len() >= p.len() {
                    if rest.starts_with(p) {
                        out.extend_from_slice(STARS);
                        i += p.len();
                        continue 'outer;
                    }
                } else if !at_end && p.starts_with(rest) {
                    return (out, i);
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        (out, i)
    }
}

/// The patterns one secret value contributes: the value itself and, for a multi-line
/// value, its LF-only form and each line long enough to mean something on its own
/// (a step may print a single line of a key, or a tool may rewrite CRLF as LF).
fn add_patterns(value: &[u8], patterns: &mut Vec<Vec<u8>>) {
    // Values read from files usually end in a newline that the step would not print.
    let value = value
        .strip_suffix(b"\r\n")
        .or_else(|| value.strip_suffix(b"\n"))
        .unwrap_or(value);
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    patterns.push(value.to_vec());
    if !value.contains(&b'\n') {
        return;
    }
    if value.windows(2).any(|w| w == b"\r\n") {
        let lf: Vec<u8> = value
            .iter()
            .enumerate()
            .filter(|&(k, &b)| !(b == b'\r' && value.get(k + 1) == Some(&b'\n')))
            .map(|(_, &b)| b)
            .collect();
        patterns.push(lf);
    }
    // Trimming drops the `\r` of CRLF lines and indentation; the trimmed line is a
    // substring of the printed one, so masking it still hides the secret part.
    for line in value.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        if line.len() >= MIN_SECRET_LEN {
            patterns.push(line.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, dependency-free randomness for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Streams `chunks` through a fresh clone of `m`, checking the hold-back bound.
    fn stream(m: &Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut m = m.clone();
        let longest = m.patterns.first().map_or(0, Vec::len);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.push(c));
            assert!(m.carry.len() <= longest.saturating_sub(1), "carry too long");
        }
        out.extend(m.finish());
        assert!(m.carry.is_empty());
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn mask_all_table() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["hunter22"], "pw=hunter22.", "pw=***."),
            (&["abab"], "ababab", "***ab"),
            (&["abab"], "abababab", "******"),
            (&["tok1", "tok2"], "tok1tok2 tok2", "****** ***"),
            (&["secret", "secret123"], "secret123 secret12", "*** ***12"),
            (&["aaab"], "aaaaab", "aa***"),
            (&["abc", "", "xy"], "abc xy", "abc xy"),
            (&["abcd\n"], "abcd\n", "***\n"),
            (&["abcd\r\n"], "abcd\r\n", "***\r\n"),
            (&["abc\n"], "abc", "abc"),
            (&["héllo"], "say héllo!", "say ***!"),
            (&["nope"], "", ""),
        ];
        for (secrets, input, want) in cases {
            let m = Masker::new(secrets.iter());
            let got = m.mask_all(input.as_bytes());
            assert_eq!(
                String::from_utf8_lossy(&got),
                *want,
                "{secrets:?} in {input:?}"
            );
        }
    }

    #[test]
    fn no_secrets_passes_through() {
        let mut m = Masker::new(Vec::<String>::new());
        assert!(!m.is_active());
        assert_eq!(m.push(b"any\xffthing"), b"any\xffthing");
        assert!(m.finish().is_empty());
        assert!(!Masker::new(["ab", "", "\n"]).is_active());
        assert!(Masker::new(["abcd"]).is_active());
    }

    #[test]
    fn multi_line_values() {
        let key = "-----BEGIN KEY-----\nMIIBOgIBAAJBAKj34\n  GkxKfq\n}\n\n-----END KEY-----\n";
        let m = Masker::new([key]);
        let mask = |s: &str| String::from_utf8_lossy(&m.mask_all(s.as_bytes())).into_owned();
        assert_eq!(mask(&format!("key:\n{key}done")), "key:\n***\ndone");
        assert_eq!(mask("line: MIIBOgIBAAJBAKj34\n"), "line: ***\n");
        assert_eq!(mask("    GkxKfq\n"), "    ***\n");
        // Short lines are not secrets on their own.
        assert_eq!(mask("fn x() {\n}\n\n"), "fn x() {\n}\n\n");

        let crlf = "first-line\r\nsecond-line\r\nab\r\n";
        let m = Masker::new([crlf]);
        let mask = |s: &str| String::from_utf8_lossy(&m.mask_all(s.as_bytes())).into_owned();
        assert_eq!(mask("first-line\r\nsecond-line\r\nab"), "***");
        assert_eq!(mask("first-line\nsecond-line\nab"), "***");
        assert_eq!(mask("x second-line\n"), "x ***\n");
        assert_eq!(mask("ab\r\n"), "ab\r\n");
    }

    #[test]
    fn binary_output_and_secrets() {
        let m = Masker::new([&b"\xff\x00\xfe\x01"[..]]);
        let mut s = m.clone();
        let mut out = s.push(b"\x80\xff\x00");
        out.extend(s.push(b"\xfe\x01\xc3"));
        out.extend(s.finish());
        assert_eq!(out, b"\x80***\xc3");
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = Masker::new(["secret"]);
        assert_eq!(m.push(b"hello world"), b"hello world");
        assert_eq!(m.push(b"xxse"), b"xx");
        assert_eq!(m.push(b""), b"");
        assert_eq!(m.push(b"cr"), b"");
        assert_eq!(m.push(b"et!se"), b"***!");
        assert_eq!(m.push(b"x"), b"sex");
        assert_eq!(m.push(b"secre"), b"");
        assert_eq!(m.finish(), b"secre");
    }

    #[test]
    fn split_inside_utf8_character() {
        let m = Masker::new(["pässwörd"]);
        let input = "a pässwörd ü".as_bytes();
        for cut in 0..=input.len() {
            let out = stream(&m, &[&input[..cut], &input[cut..]]);
            assert_eq!(out, "a *** ü".as_bytes(), "cut at {cut}");
        }
    }

    /// Every way of chunking each input (all 2^(n-1) compositions, plus empty chunks at
    /// the ends) gives the same output as masking it whole.
    #[test]
    fn every_split_matches_mask_all() {
        let cases: &[(&[&str], &str)] = &[
            (&["abab"], "xabababx abab"),
            (&["aaab"], "aaaaabaaab"),
            (&["secret", "secret12", "cret"], "secret1secret12"),
            (&["tok1", "tok2"], "tok1tok2tok"),
            (&["ab\ncd-ef\r\ngh"], "ab\ncd-ef\ngh cd-e"),
            (&["aaaa", "aaaaaa"], "aaaaaaaaaaaa"),
        ];
        for (secrets, input) in cases {
            let m = Masker::new(secrets.iter());
            let input = input.as_bytes();
            let want = m.mask_all(input);
            let n = input.len();
            for mask in 0u32..(1 << (n - 1)) {
                let mut chunks: Vec<&[u8]> = vec![b""];
                let mut start = 0;
                for k in 1..n {
                    if mask & (1 << (k - 1)) != 0 {
                        chunks.push(&input[start..k]);
                        start = k;
                    }
                }
                chunks.push(&input[start..]);
                chunks.push(b"");
                assert_eq!(stream(&m, &chunks), want, "{secrets:?} split {mask:b}");
            }
        }
    }

    /// Random secrets and inputs over a tiny alphabet (so matches, overlaps and partial
    /// prefixes are frequent), cut at random points, including empty chunks.
    #[test]
    fn random_splits_match_mask_all() {
        let alphabet = b"ab\n\r\xff";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..4000 {
            let mut word = |max: usize| -> Vec<u8> {
                let len = rng.below(max + 1);
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect()
            };
            let secrets: Vec<Vec<u8>> = (0..1 + case % 4).map(|_| word(7)).collect();
            let input = word(40);
            let m = Masker::new(&secrets);
            let want = m.mask_all(&input);
            for p in &m.patterns {
                assert!(!contains(&want, p), "case {case}: {p:?} left in output");
            }
            let mut chunks = Vec::new();
            let mut start = 0;
            while start < input.len() {
                let end = (start + rng.below(6)).min(input.len());
                chunks.push(&input[start..end]);
                start = end;
            }
            assert_eq!(
                stream(&m, &chunks),
                want,
                "case {case}: {secrets:?} {input:?}"
            );
        }
    }

    #[test]
    fn large_chunks_many_secrets() {
        let secrets: Vec<String> = (0..40).map(|k| format!("token-{k:03}-xyz")).collect();
        let m = Masker::new(&secrets);
        let mut input = Vec::new();
        for k in 0..2000 {
            input.extend_from_slice(format!("line {k} token-{:03}-xyz tok\n", k % 50).as_bytes());
        }
        let want = m.mask_all(&input);
        let chunks: Vec<&[u8]> = input.chunks(8192).collect();
        assert_eq!(stream(&m, &chunks), want);
        assert!(!contains(&want, b"token-001-xyz"));
        assert!(contains(&want, b"token-045-xyz"));
    }
}
