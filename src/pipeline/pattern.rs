//! GitHub Actions filter patterns, as used by `on.push.branches`, `tags` and `paths`.
//!
//! This module owns pure pattern compilation and matching: no I/O, no global state. The
//! matcher stage uses it to decide whether a pushed ref or a changed path selects a
//! pipeline. Matching simulates an NFA over the compiled tokens, so it costs
//! O(pattern length × text length) for every input and never backtracks exponentially.

/// The characters a single token may consume.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CharSet {
    Char(char),
    /// Inclusive ranges; a single listed character is a range of one.
    Class(Vec<(char, char)>),
    NotSlash,
    Any,
}

impl CharSet {
    fn contains(&self, c: char) -> bool {
        match self {
            CharSet::Char(x) => *x == c,
            CharSet::Class(ranges) => ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c)),
            CharSet::NotSlash => c != '/',
            CharSet::Any => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    One,
    ZeroOrOne,
    OneOrMore,
    ZeroOrMore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Atom {
        set: CharSet,
        repeat: Repeat,
    },
    /// The next `len` tokens form a group that may be skipped as a whole; `**/` needs it
    /// because "nothing" and "some directories ending in `/`" are its only valid matches.
    Optional {
        len: usize,
    },
}

/// One compiled filter pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    src: String,
    negated: bool,
    tokens: Vec<Token>,
    /// The characters every match starts with (the leading single literal characters),
    /// compared as a string before any state is simulated: most branch and tag
    /// patterns (`main`, `release/**`, `team/old-*`) are decided by it alone.
    prefix: String,
    /// What follows the prefix.
    rest: Rest,
}

/// The part of a pattern after its literal prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// Nothing: the pattern is a literal.
    Nothing,
    /// `**` and nothing after it: any text that starts with the prefix.
    Anything,
    /// The tokens from this index on, simulated.
    Tokens(usize),
}

/// Patterns of up to this many tokens are simulated with their states on the stack.
const STACK_STATES: usize = 64;

/// Why a pattern failed to compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as written, including any leading `!`.
    pub pattern: String,
    /// What is wrong with it; positions are char offsets into `pattern`.
    pub reason: String,
}

impl Pattern {
    /// Compiles one pattern. A leading `!` marks it negated.
    pub fn parse(src: &str) -> Result<Pattern, PatternError> {
        let err = |reason: String| PatternError {
            pattern: src.to_owned(),
            reason,
        };
        if src.is_empty() {
            return Err(err("empty pattern".into()));
        }
        let negated = src.starts_with('!');
        if src == "!" {
            return Err(err("nothing after the negating `!`".into()));
        }
        let tokens = compile(src, usize::from(negated)).map_err(err)?;
        let prefix: String = tokens
            .iter()
            .map_while(|t| match t {
                Token::Atom {
                    set: CharSet::Char(c),
                    repeat: Repeat::One,
                } => Some(*c),
                _ => None,
            })
            .collect();
        let literal = prefix.chars().count();
        let rest = match &tokens[literal..] {
            [] => Rest::Nothing,
            [Token::Atom {
                set: CharSet::Any,
                repeat: Repeat::ZeroOrMore,
            }] => Rest::Anything,
            _ => Rest::Tokens(literal),
        };
        Ok(Pattern {
            src: src.to_owned(),
            negated,
            tokens,
            prefix,
            rest,
        })
    }

    /// The original text, including any leading `!`.
    pub fn as_str(&self) -> &str {
        &self.src
    }

    /// Whether the pattern starts with `!`, i.e. excludes what it matches.
    pub fn is_negated(&self) -> bool {
        self.negated
    }

    /// Whether the pattern body (ignoring negation) matches the whole `text`.
    pub fn matches(&self, text: &str) -> bool {
        let Some(after) = text.strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        match self.rest {
            Rest::Nothing => after.is_empty(),
            Rest::Anything => true,
            Rest::Tokens(from) => self.simulate(from, after),
        }
    }

    /// Whether the tokens from index `from` on match the whole `text`.
    fn simulate(&self, from: usize, text: &str) -> bool {
        let n = self.tokens.len();
        let mut stack = [false; 2 * STACK_STATES];
        let mut heap = Vec::new();
        let states = if n < STACK_STATES {
            &mut stack[..]
        } else {
            heap.resize(2 * (n + 1), false);
            &mut heap[..]
        };
        let (cur, next) = states.split_at_mut(states.len() / 2);
        let (mut cur, mut next) = (&mut cur[..=n], &mut next[..=n]);
        cur[from] = true;
        self.close(cur);
        for c in text.chars() {
            next.fill(false);
            for (i, token) in self.tokens.iter().enumerate().skip(from) {
                let Token::Atom { set, repeat } = token else {
                    continue;
                };
                if !cur[i] || !set.contains(c) {
                    continue;
                }
                match repeat {
                    Repeat::One | Repeat::ZeroOrOne => next[i + 1] = true,
                    // Staying on `i` means "at least one more"; with `i + 1` that is "one or more".
                    Repeat::OneOrMore => {
                        next[i] = true;
                        next[i + 1] = true;
                    }
                    Repeat::ZeroOrMore => next[i] = true,
                }
            }
            self.close(next);
            if !next.contains(&true) {
                return false;
            }
            std::mem::swap(&mut cur, &mut next);
        }
        cur[n]
    }

    /// Adds the states reachable without consuming a character.
    fn close(&self, states: &mut [bool]) {
        // Every epsilon edge points forward, so one ascending pass reaches the fixpoint.
        for (i, token) in self.tokens.iter().enumerate() {
            if !states[i] {
                continue;
            }
            match token {
                Token::Optional { len } => {
                    states[i + 1] = true;
                    states[i + 1 + len] = true;
                }
                Token::Atom {
                    repeat: Repeat::ZeroOrOne | Repeat::ZeroOrMore,
                    ..
                } => states[i + 1] = true,
                Token::Atom { .. } => {}
            }
        }
    }
}

/// Compiles `src` from char offset `start` (past any `!`) into tokens.
fn compile(src: &str, start: usize) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    // `?`/`+` may only follow a single character or class, never a star or another quantifier.
    let mut repeatable = false;
    let mut i = start;
    while let Some(&c) = chars.get(i) {
        let at = i;
        i += 1;
        let set = match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                let at_segment_start = matches!(
                    tokens.last(),
                    None | Some(Token::Atom {
                        set: CharSet::Char('/'),
                        repeat: Repeat::One
                    })
                );
                if at_segment_start && chars.get(i) == Some(&'/') {
                    // `**/` is "(.+/)?": zero or more whole directories, so `**/a` matches `a`.
                    i += 1;
                    tokens.push(Token::Optional { len: 2 });
                    tokens.push(atom(CharSet::Any, Repeat::OneOrMore));
                    tokens.push(atom(CharSet::Char('/'), Repeat::One));
                } else {
                    tokens.push(atom(CharSet::Any, Repeat::ZeroOrMore));
                }
                repeatable = false;
                continue;
            }
            '*' => {
                tokens.push(atom(CharSet::NotSlash, Repeat::ZeroOrMore));
                repeatable = false;
                continue;
            }
            '?' | '+' => {
                let quantifier = if c == '?' {
                    Repeat::ZeroOrOne
                } else {
                    Repeat::OneOrMore
                };
                match tokens.last_mut() {
                    Some(Token::Atom { repeat, .. }) if repeatable => *repeat = quantifier,
                    _ => return Err(format!("`{c}` at {at} has no character or class to repeat")),
                }
                repeatable = false;
                continue;
            }
            '\\' => {
                let escaped = chars
                    .get(i)
                    .ok_or_else(|| format!("trailing `\\` at {at}"))?;
                i += 1;
                CharSet::Char(*escaped)
            }
            '[' => {
                let (ranges, after) = parse_class(&chars, i)?;
                i = after;
                CharSet::Class(ranges)
            }
            _ => CharSet::Char(c),
        };
        tokens.push(atom(set, Repeat::One));
        repeatable = true;
    }
    Ok(tokens)
}

fn atom(set: CharSet, repeat: Repeat) -> Token {
    Token::Atom { set, repeat }
}

/// Parses a class body starting just after its `[`; returns the ranges and the index
/// after the closing `]`.
fn parse_class(chars: &[char], start: usize) -> Result<(Vec<(char, char)>, usize), String> {
    let open = start - 1;
    let unclosed = || format!("unclosed `[` at {open}");
    // A member may be escaped, so `[\]]` can list a `]`.
    let member = |i: usize| match chars.get(i) {
        Some('\\') => chars.get(i + 1).map(|&c| (c, i + 2)),
        Some(&c) => Some((c, i + 1)),
        None => None,
    };
    let mut ranges = Vec::new();
    let mut i = start;
    while chars.get(i) != Some(&']') {
        let (lo, after) = member(i).ok_or_else(unclosed)?;
        i = after;
        // A `-` right before the `]` is literal, as in `[a-]`.
        let hi = if chars.get(i) == Some(&'-') && !matches!(chars.get(i + 1), None | Some(']')) {
            let (hi, after) = member(i + 1).ok_or_else(unclosed)?;
            i = after;
            hi
        } else {
            lo
        };
        if lo > hi {
            return Err(format!("descending range `{lo}-{hi}` in `[` at {open}"));
        }
        ranges.push((lo, hi));
    }
    if ranges.is_empty() {
        return Err(format!("empty `[]` at {open}"));
    }
    Ok((ranges, i + 1))
}

/// An ordered list of patterns. GitHub semantics: patterns are evaluated in order and the
/// last one that matches decides: a matching positive pattern includes, a matching
/// negated pattern excludes; if none matches, the text is excluded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PatternList {
    patterns: Vec<Pattern>,
}

/// The outcome of [`PatternList::evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match<'a> {
    /// Whether the text is selected by the list.
    pub included: bool,
    /// The last pattern that matched, which made the decision; `None` if none matched.
    pub decided_by: Option<&'a Pattern>,
}

impl PatternList {
    /// Wraps already-compiled patterns, keeping their order.
    pub fn new(patterns: Vec<Pattern>) -> PatternList {
        PatternList { patterns }
    }

    /// Compiles every pattern in order, failing with the first error.
    pub fn parse<S: AsRef<str>>(srcs: &[S]) -> Result<PatternList, PatternError> {
        let patterns = srcs
            .iter()
            .map(|s| Pattern::parse(s.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(PatternList { patterns })
    }

    /// The patterns, in evaluation order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether the list has no patterns (and so excludes everything).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The decision and the pattern that made it (None when no pattern matched).
    pub fn evaluate(&self, text: &str) -> Match<'_> {
        // The last match wins, so scanning backwards lets us stop at the first hit.
        match self.patterns.iter().rev().find(|p| p.matches(text)) {
            Some(p) => Match {
                included: !p.negated,
                decided_by: Some(p),
            },
            None => Match {
                included: false,
                decided_by: None,
            },
        }
    }

    /// Whether the list includes `text`; shorthand for `evaluate(text).included`.
    pub fn is_match(&self, text: &str) -> bool {
        self.evaluate(text).included
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (pattern, texts it must match, texts it must not match).
    // One row per pattern reads as a table; rustfmt would spread each row over many lines.
    #[rustfmt::skip]
    const MATCH_CASES: &[(&str, &[&str], &[&str])] = &[
        // GitHub cheat sheet: branches and tags.
        ("feature/*", &["feature/my-branch", "feature/your-branch"], &["feature/your-branch/x", "feature"]),
        ("feature/**", &["feature/beta-a/my-branch", "feature/your-branch", "feature/mona/the/octocat", "feature/"], &["feature"]),
        ("main", &["main"], &["main2", "mai", "x/main"]),
        ("releases/mona-the-octocat", &["releases/mona-the-octocat"], &["releases/mona"]),
        ("*", &["main", "releases", "README.md", "server.rb", ""], &["releases/x"]),
        ("**", &["all/the/branches", "every/tag", "all/the/files.md", ""], &[]),
        ("*feature", &["mona-feature", "feature", "ver-10-feature"], &["feature-x", "a/feature"]),
        ("v2*", &["v2", "v2.0", "v2.9"], &["v3", "v2/x"]),
        ("v[12].[0-9]+.[0-9]+", &["v1.10.1", "v2.0.0"], &["v3.0.0", "v1.a.1", "v1..1", "v1x0.0"]),
        // GitHub cheat sheet: paths.
        ("*.jsx?", &["page.js", "page.jsx"], &["page.jsxx", "src/page.js"]),
        ("*.js", &["app.js", "index.js"], &["js/index.js"]),
        ("**.js", &["app.js", "index.js", "js/index.js", "src/js/app.js"], &["app.jsx"]),
        ("docs/*", &["docs/README.md", "docs/file.txt"], &["docs/mona/octocat.txt"]),
        ("docs/**", &["docs/README.md", "docs/mona/octocat.txt"], &["docs", "README.md"]),
        ("docs/**/*.md", &["docs/README.md", "docs/mona/hello-world.md", "docs/a/markdown/file.md"], &["docs/a/file.txt", "README.md"]),
        ("**/docs/**", &["docs/hello.md", "dir/docs/my-file.txt", "space/docs/plan/space.doc"], &["mydocs/x", "/docs/x"]),
        ("**/README.md", &["README.md", "js/README.md"], &["xREADME.md", "/README.md"]),
        ("**/*src/**", &["a/src/app.js", "my-src/code/js/app.js"], &["src"]),
        ("**/*-post.md", &["my-post.md", "path/their-post.md"], &["post.md"]),
        ("**/migrate-*.sql", &["migrate-10909.sql", "db/migrate-v1.0.sql", "db/sept/migrate-v1.sql"], &["db/migrate.sql"]),
        // Quantifiers on characters and classes.
        ("colou?r", &["color", "colour"], &["colouur"]),
        ("a+b", &["ab", "aaab"], &["b"]),
        ("x[0-9]?y", &["xy", "x5y"], &["x55y", "xay"]),
        ("[ab]+", &["a", "abba"], &["", "abc"]),
        ("a/+b", &["a/b", "a//b"], &["ab"]),
        // Escapes and literal specials.
        ("a\\*b", &["a*b"], &["axb", "ab"]),
        ("\\?x", &["?x"], &["x"]),
        ("a\\+", &["a+"], &["a", "aa"]),
        ("\\[x\\]", &["[x]"], &["x"]),
        ("\\!neg", &["!neg"], &["neg"]),
        ("a\\\\b", &["a\\b"], &["ab"]),
        ("a!b", &["a!b"], &["ab"]),
        ("a]b", &["a]b"], &[]),
        // Class edge cases.
        ("[-a]", &["-", "a"], &["b"]),
        ("[a-]", &["-", "a"], &["b"]),
        ("[\\]]", &["]"], &["\\"]),
        ("[a-cx]", &["b", "x"], &["d"]),
        // `**` away from a segment start is a plain "anything".
        ("a**b", &["ab", "a/x/b"], &["a/x/c"]),
        ("a/**/b", &["a/b", "a/x/y/b"], &["ab"]),
        ("a*b", &["ab", "axxb"], &["a/b"]),
        // Unicode is matched per char, not per byte.
        ("café/*", &["café/menu"], &["cafe/menu"]),
        ("[α-ω]+", &["λογος"], &["logos", ""]),
        ("x[é]?y", &["xy", "xéy"], &["xey"]),
        ("🦀*", &["🦀", "🦀rust"], &["rust"]),
        // Empty text.
        ("a?", &[""], &["aa"]),
        ("a", &[], &[""]),
        ("a+", &[], &[""]),
        // Negation does not change what the body matches.
        ("!*.md", &["README.md"], &["a.txt"]),
    ];

    #[test]
    fn pattern_matches_table() {
        let mut checked = 0;
        for &(src, yes, no) in MATCH_CASES {
            let pattern = Pattern::parse(src).expect(src);
            for &(texts, expected) in &[(yes, true), (no, false)] {
                for text in texts {
                    assert_eq!(pattern.matches(text), expected, "{src:?} vs {text:?}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 45, "only {checked} cases");
    }

    /// The literal prefix and the shortcuts after it decide exactly as simulating every
    /// token from the first would, on every text of the table and a few more.
    #[test]
    fn shortcuts_agree_with_the_full_simulation() {
        let extra: &[&str] = &[
            "release/2.5",
            "release",
            "release/",
            "mai",
            "main/x",
            "v",
            "",
        ];
        let mut shortcuts = 0;
        for &(src, yes, no) in MATCH_CASES
            .iter()
            .chain(&[("release/**", &[][..], &[][..]), ("v*", &[], &[])])
        {
            let pattern = Pattern::parse(src).expect(src);
            if pattern.rest != Rest::Tokens(0) {
                shortcuts += 1;
            }
            for text in yes.iter().chain(no).chain(extra) {
                assert_eq!(
                    pattern.matches(text),
                    pattern.simulate(0, text),
                    "{src:?} vs {text:?}"
                );
            }
        }
        assert!(shortcuts >= 20, "only {shortcuts} patterns take a shortcut");
        let literal = Pattern::parse("main").expect("valid");
        assert_eq!(
            (literal.prefix.as_str(), literal.rest),
            ("main", Rest::Nothing)
        );
        let prefix = Pattern::parse("!release/**").expect("valid");
        assert_eq!(
            (prefix.prefix.as_str(), prefix.rest),
            ("release/", Rest::Anything)
        );
        let long = Pattern::parse(&format!("{}*", "[ab]".repeat(STACK_STATES))).expect("valid");
        assert!(long.matches(&"ab".repeat(STACK_STATES / 2)));
        assert!(!long.matches(&"abc".repeat(STACK_STATES / 3)));
    }

    /// (patterns, text, included, index of the deciding pattern).
    const LIST_CASES: &[(&[&str], &str, bool, Option<usize>)] = &[
        (&["*.md", "!README.md"], "hello.md", true, Some(0)),
        (&["*.md", "!README.md"], "README.md", false, Some(1)),
        (&["*.md", "!README.md"], "docs/hello.md", false, None),
        (
            &["*.md", "!README.md", "README*"],
            "README.md",
            true,
            Some(2),
        ),
        (
            &["*.md", "!README.md", "README*"],
            "README.doc",
            true,
            Some(2),
        ),
        (
            &["*.md", "!README.md", "README*"],
            "docs/todo.md",
            false,
            None,
        ),
        (
            &["*.md", "!README.md", "README*"],
            "hello.md",
            true,
            Some(0),
        ),
        (&["!main"], "main", false, Some(0)),
        (&["!main"], "dev", false, None),
        (&[], "main", false, None),
        (&["main", "main"], "main", true, Some(1)),
        (&["**", "!releases/**"], "releases/v1", false, Some(1)),
        (&["**", "!releases/**"], "feature/x", true, Some(0)),
        (&["!releases/**", "**"], "releases/v1", true, Some(1)),
    ];

    #[test]
    fn pattern_list_evaluate_table() {
        for &(srcs, text, included, decided) in LIST_CASES {
            let list = PatternList::parse(srcs).expect("valid list");
            let got = list.evaluate(text);
            let want = decided.map(|i| &list.patterns()[i]);
            assert_eq!(got.included, included, "{srcs:?} vs {text:?}");
            assert_eq!(got.decided_by, want, "{srcs:?} vs {text:?}");
            // Pointer identity, not just equality: `["main", "main"]` must name the last.
            assert!(got
                .decided_by
                .zip(want)
                .is_none_or(|(a, b)| std::ptr::eq(a, b)));
            assert_eq!(list.is_match(text), included);
        }
    }

    /// (pattern, the start of the expected reason).
    const INVALID: &[(&str, &str)] = &[
        ("", "empty pattern"),
        ("!", "nothing after the negating `!`"),
        ("?a", "`?` at 0 has no character or class to repeat"),
        ("+a", "`+` at 0 has no character or class to repeat"),
        ("!?a", "`?` at 1 has no character or class to repeat"),
        ("*?", "`?` at 1 has no character or class"),
        ("**+", "`+` at 2 has no character or class"),
        ("a??", "`?` at 2 has no character or class"),
        ("a?+", "`+` at 2 has no character or class"),
        ("a\\", "trailing `\\` at 1"),
        ("[abc", "unclosed `[` at 0"),
        ("x[a-", "unclosed `[` at 1"),
        ("[a\\", "unclosed `[` at 0"),
        ("[]", "empty `[]` at 0"),
        ("v[z-a]", "descending range `z-a` in `[` at 1"),
    ];

    #[test]
    fn invalid_patterns_table() {
        for &(src, reason) in INVALID {
            let err = Pattern::parse(src).expect_err(src);
            assert_eq!(err.pattern, src);
            assert!(err.reason.starts_with(reason), "{src:?}: {}", err.reason);
        }
        let err = PatternList::parse(&["ok", "[", "?"]).expect_err("second is bad");
        assert_eq!(err.pattern, "[");
        assert_eq!(err.to_string(), "bad pattern \"[\": unclosed `[` at 0");
    }

    #[test]
    fn accessors() {
        let p = Pattern::parse("!docs/**").expect("valid");
        assert!(p.is_negated());
        assert_eq!(p.as_str(), "!docs/**");
        assert!(!Pattern::parse("\\!x").expect("valid").is_negated());
        assert!(PatternList::default().is_empty());
        assert!(!PatternList::new(vec![p]).is_empty());
    }

    #[test]
    fn pathological_input_is_not_exponential() {
        let text = "a".repeat(200);
        let p = Pattern::parse("*a*a*a*a*a*a*b").expect("valid");
        assert!(!p.matches(&text));
        assert!(p.matches(&format!("{text}b")));
        let nested = Pattern::parse("**a**a**a**a**a**a**b").expect("valid");
        assert!(!nested.matches(&"a/".repeat(100)));
    }
}
