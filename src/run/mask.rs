//! Secret masking for step logs: replaces every occurrence of a pipeline's secret values
//! in a byte stream with `***`, including occurrences split across chunk boundaries.
//! It sits between a step's output pipes and its log file (and can mask whole texts such
//! as API output or daemon log fields). Pure byte processing: no I/O, no UTF-8
//! assumptions, no knowledge of where the values came from.

use std::ops::Range;

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;

/// Values shorter than this many bytes are never masked: they are too short to be secret,
/// and masking e.g. `1` or `on` would make every log unreadable. For a multi-line value the
/// same limit applies to each (whitespace-trimmed) line that is masked on its own.
pub const MIN_SECRET_LEN: usize = 4;

const STARS: &[u8] = b"***";

/// A streaming masker. Matching is greedy from left to right; at each position the longest
/// matching pattern wins, so the result never depends on how the input was chunked.
#[derive(Debug, Clone)]
pub struct Masker {
    /// Distinct patterns, longest first.
    patterns: Vec<Vec<u8>>,
    /// Finds the patterns in a chunk at memchr speed (a vectorised prefilter over the
    /// patterns' first bytes), leftmost-longest: the same matches as trying every
    /// position with the longest pattern first. `None` when there is nothing to mask.
    finder: Option<AhoCorasick>,
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
        let finder = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                // Only an automaton of more than 2^31 states is refused: secrets of
                // gigabytes, which no step environment could hold anyway.
                .expect("secret patterns within the automaton's limits")
        });
        Masker {
            patterns,
            finder,
            carry: Vec::new(),
        }
    }

    /// Whether there is anything to mask (when false, callers may bypass it).
    pub fn is_active(&self) -> bool {
        self.finder.is_some()
    }

    /// Feeds a chunk; returns the bytes that are now safe to write (masked). Bytes that
    /// could still be the start of a secret are held back (at most longest_secret - 1
    /// bytes). A chunk with nothing to mask comes back as the same buffer, not a copy.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if !self.is_active() {
            return chunk;
        }
        let mut buf = if self.carry.is_empty() {
            chunk
        } else {
            // Only after a chunk that ended in what may begin a secret: rare, and the
            // one case where the chunk is copied though nothing in it is masked.
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(&chunk);
            Bytes::from(joined)
        };
        let (spans, done) = self.find(&buf, false);
        self.carry.extend_from_slice(&buf[done..]);
        buf.truncate(done);
        if spans.is_empty() {
            buf
        } else {
            Bytes::from(masked(&buf, &spans))
        }
    }

    /// End of stream: the held-back tail, masked.
    pub fn finish(&mut self) -> Bytes {
        let tail = std::mem::take(&mut self.carry);
        Bytes::from(self.mask_all(&tail))
    }

    /// Convenience for whole texts (API output, daemon log fields): masks `text` in one go.
    pub fn mask_all(&self, text: &[u8]) -> Vec<u8> {
        let (spans, _) = self.find(text, true);
        masked(text, &spans)
    }

    /// The secrets in `buf` from its start, as the byte ranges to replace, and how many
    /// bytes of `buf` they account for. Unless `at_end`, that stops at the first position
    /// the scan reaches where a pattern could match but runs past the end of `buf`: only
    /// more input can decide it (and whether a longer pattern beats a shorter one that
    /// already matches there). The rest is the caller's carry; it is shorter than that
    /// pattern, hence shorter than the longest one.
    fn find(&self, buf: &[u8], at_end: bool) -> (Vec<Range<usize>>, usize) {
        let Some(finder) = &self.finder else {
            return (Vec::new(), buf.len());
        };
        // Only a position this close to the end can begin a pattern longer than what is left.
        let near_end = if at_end {
            buf.len()
        } else {
            buf.len().saturating_sub(self.patterns[0].len() - 1)
        };
        // The scan reaches every position outside a match, and each match's start.
        let undecided = |from: usize, to: usize| {
            (from.max(near_end)..to).find(|&at| {
                let rest = &buf[at..];
                self.patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            })
        };
        let mut spans = Vec::new();
        let mut scanned = 0;
        for found in finder.find_iter(buf) {
            if let Some(at) = undecided(scanned, found.start() + 1) {
                return (spans, at);
            }
            spans.push(found.range());
            scanned = found.end();
        }
        let done = undecided(scanned, buf.len()).unwrap_or(buf.len());
        (spans, done)
    }
}

/// `buf` with each of `spans` (in order, disjoint) replaced by `***`.
fn masked(buf: &[u8], spans: &[Range<usize>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len());
    let mut copied = 0;
    for span in spans {
        out.extend_from_slice(&buf[copied..span.start]);
        out.extend_from_slice(STARS);
        copied = span.end;
    }
    out.extend_from_slice(&buf[copied..]);
    out
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

    fn feed(m: &mut Masker, chunk: &[u8]) -> Vec<u8> {
        m.push(Bytes::copy_from_slice(chunk)).to_vec()
    }

    /// Streams `chunks` through a fresh clone of `m`, checking the hold-back bound.
    fn stream(m: &Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut m = m.clone();
        let longest = m.patterns.first().map_or(0, Vec::len);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(feed(&mut m, c));
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
        assert_eq!(feed(&mut m, b"any\xffthing"), b"any\xffthing");
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
        let mut out = feed(&mut s, b"\x80\xff\x00");
        out.extend(feed(&mut s, b"\xfe\x01\xc3"));
        out.extend(s.finish());
        assert_eq!(out, b"\x80***\xc3");
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = Masker::new(["secret"]);
        assert_eq!(feed(&mut m, b"hello world"), b"hello world");
        assert_eq!(feed(&mut m, b"xxse"), b"xx");
        assert_eq!(feed(&mut m, b""), b"");
        assert_eq!(feed(&mut m, b"cr"), b"");
        assert_eq!(feed(&mut m, b"et!se"), b"***!");
        assert_eq!(feed(&mut m, b"x"), b"sex");
        assert_eq!(feed(&mut m, b"secre"), b"");
        assert_eq!(m.finish(), &b"secre"[..]);
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

    /// The masker as it was before the automaton: every position tried with every pattern,
    /// longest first. What the fast search must agree with.
    fn reference(m: &Masker, buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        'outer: while i < buf.len() {
            for p in &m.patterns {
                if buf[i..].starts_with(p) {
                    out.extend_from_slice(STARS);
                    i += p.len();
                    continue 'outer;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }

    #[test]
    fn fast_search_agrees_with_trying_every_position() {
        let alphabet = b"abc\n";
        let mut rng = Rng(0x0123_4567_89AB_CDEF);
        for case in 0..3000 {
            let mut word = |max: usize| -> Vec<u8> {
                let len = rng.below(max + 1);
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect()
            };
            let secrets: Vec<Vec<u8>> = (0..1 + case % 5).map(|_| word(9)).collect();
            let input = word(200);
            let m = Masker::new(&secrets);
            assert_eq!(
                m.mask_all(&input),
                reference(&m, &input),
                "case {case}: {secrets:?} {input:?}"
            );
        }
    }

    /// Chunks as a step's pipe gives them now (up to hundreds of KiB), with secrets across
    /// every border: at each offset around it, and longer than some chunks.
    #[test]
    fn secrets_across_the_borders_of_big_reads() {
        let secrets = ["tok-3f9a1c77", "tok-3f9a1c77-and-more", "x\ny\nzzzz"];
        let m = Masker::new(secrets);
        let mut input = Vec::new();
        let mut rng = Rng(0xDEAD_BEEF_F00D_CAFE);
        while input.len() < 3 << 20 {
            let filler = rng.below(300);
            input.extend(std::iter::repeat_n(b't', filler));
            input.extend_from_slice(secrets[rng.below(secrets.len())].as_bytes());
        }
        let want = reference(&m, &input);
        for size in [64 << 10, 128 << 10, 256 << 10, (256 << 10) + 7] {
            let chunks: Vec<&[u8]> = input.chunks(size).collect();
            assert_eq!(stream(&m, &chunks), want, "chunks of {size}");
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < input.len() {
            let end = (start + 1 + rng.below(300 << 10)).min(input.len());
            chunks.push(&input[start..end]);
            start = end;
        }
        assert_eq!(stream(&m, &chunks), want, "chunks of random sizes");
        assert!(!contains(&want, b"tok-3f9a1c77"));
    }

    #[test]
    fn a_chunk_without_secrets_is_passed_on_not_copied() {
        let mut m = Masker::new(["tok-3f9a1c77"]);
        let chunk = Bytes::from(b"line one\nline two\n".repeat(1000));
        let at = chunk.as_ptr();
        let out = m.push(chunk);
        assert_eq!(out.as_ptr(), at);
        assert_eq!(out.len(), 18_000);
        // Held back: a possible start of the secret, passed on once it is known not to be.
        let out = m.push(Bytes::from_static(b"last line tok-3f"));
        assert_eq!(out, &b"last line "[..]);
        let out = m.push(Bytes::from_static(b"ine\n"));
        assert_eq!(out, &b"tok-3fine\n"[..]);
    }
}
