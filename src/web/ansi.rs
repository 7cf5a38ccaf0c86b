//! Step output with ANSI colour codes (SGR) as HTML: escaped text in `<span>`s whose
//! classes the stylesheet colours (`f0`..`f15` foreground, `g0`..`g15` background, `b`
//! bold, `d` dim, `i` italic, `u` underline); 256-colour and true-colour codes become
//! an inline colour. Other escape sequences (cursor moves, titles) are dropped.
//! `assets/hookci.js` does the same for output that arrives live; keep the two alike.

use std::fmt::Write;

/// A colour: one of the 16 named ones, or an exact one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Colour {
    Named(u8),
    Rgb(u8, u8, u8),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    fg: Option<Colour>,
    bg: Option<Colour>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
}

impl Style {
    fn apply(&mut self, params: &[u16]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Style::default();
        }
        while i < params.len() {
            let p = params[i];
            match p {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some(Colour::Named((p - 30) as u8)),
                90..=97 => self.fg = Some(Colour::Named((p - 90 + 8) as u8)),
                39 => self.fg = None,
                40..=47 => self.bg = Some(Colour::Named((p - 40) as u8)),
                100..=107 => self.bg = Some(Colour::Named((p - 100 + 8) as u8)),
                49 => self.bg = None,
                38 | 48 => {
                    let (colour, used) = extended(&params[i + 1..]);
                    if p == 38 {
                        self.fg = colour.or(self.fg);
                    } else {
                        self.bg = colour.or(self.bg);
                    }
                    i += used;
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// SGR parameters that make this style from none.
    fn sgr(&self) -> String {
        let mut params: Vec<String> = Vec::new();
        for (on, p) in [
            (self.bold, "1"),
            (self.dim, "2"),
            (self.italic, "3"),
            (self.underline, "4"),
        ] {
            if on {
                params.push(p.to_owned());
            }
        }
        for (colour, base, bright, extended) in [(self.fg, 30, 90, 38), (self.bg, 40, 100, 48)] {
            match colour {
                Some(Colour::Named(n)) if n < 8 => params.push((base + u16::from(n)).to_string()),
                Some(Colour::Named(n)) => params.push((bright + u16::from(n) - 8).to_string()),
                Some(Colour::Rgb(r, g, b)) => params.push(format!("{extended};2;{r};{g};{b}")),
                None => {}
            }
        }
        params.join(";")
    }

    fn open_tag(&self, out: &mut String) -> bool {
        if *self == Style::default() {
            return false;
        }
        let mut classes = Vec::new();
        let mut style = String::new();
        for (colour, class, prop) in [(self.fg, 'f', "color"), (self.bg, 'g', "background")] {
            match colour {
                Some(Colour::Named(n)) => classes.push(format!("{class}{n}")),
                Some(Colour::Rgb(r, g, b)) => {
                    let _ = write!(style, "{prop}:#{r:02x}{g:02x}{b:02x};");
                }
                None => {}
            }
        }
        for (on, class) in [
            (self.bold, "b"),
            (self.dim, "d"),
            (self.italic, "i"),
            (self.underline, "u"),
        ] {
            if on {
                classes.push(class.to_owned());
            }
        }
        out.push_str("<span");
        if !classes.is_empty() {
            let _ = write!(out, " class=\"{}\"", classes.join(" "));
        }
        if !style.is_empty() {
            let _ = write!(out, " style=\"{style}\"");
        }
        out.push('>');
        true
    }
}

/// `5;N` (256 colours) or `2;R;G;B` after a 38 or 48: the colour, and how many
/// parameters it took.
fn extended(rest: &[u16]) -> (Option<Colour>, usize) {
    match rest {
        [5, n, ..] => (Some(xterm_256(*n)), 2),
        [2, r, g, b, ..] => (Some(Colour::Rgb(byte(*r), byte(*g), byte(*b))), 4),
        [5] => (None, 1),
        [2, ..] => (None, rest.len()),
        _ => (None, 0),
    }
}

fn byte(v: u16) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

fn xterm_256(n: u16) -> Colour {
    let n = byte(n);
    match n {
        0..=15 => Colour::Named(n),
        16..=231 => {
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            let i = n - 16;
            Colour::Rgb(level(i / 36), level(i / 6 % 6), level(i % 6))
        }
        _ => {
            let grey = 8 + (n - 232) * 10;
            Colour::Rgb(grey, grey, grey)
        }
    }
}

pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// `text` (a whole log, or its tail) as HTML for a `<pre>`.
pub fn to_html(text: &str) -> String {
    render(text).0
}

/// [`to_html`], and the style in force at the end of `text` as SGR parameters (`1;31`;
/// empty for none): a run page gives it to its script, which goes on colouring the
/// output that follows as the log would.
pub fn to_html_and_style(text: &str) -> (String, String) {
    let (html, style) = render(text);
    (html, style.sgr())
}

fn render(text: &str) -> (String, Style) {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut style = Style::default();
    let mut open = false;
    let mut rest = text;
    while let Some(at) = rest.find('\u{1b}') {
        escape_into(&mut out, &rest[..at]);
        let (params, len) = sequence(&rest[at..]);
        if let Some(params) = params {
            let before = style;
            style.apply(&params);
            if style != before {
                if open {
                    out.push_str("</span>");
                }
                open = style.open_tag(&mut out);
            }
        }
        rest = &rest[at + len..];
    }
    escape_into(&mut out, rest);
    if open {
        out.push_str("</span>");
    }
    (out, style)
}

/// The escape sequence `s` starts with: its SGR parameters if it is one, and its
/// length (to the end of `s` if it is cut off there).
fn sequence(s: &str) -> (Option<Vec<u16>>, usize) {
    let bytes = s.as_bytes();
    match bytes.get(1) {
        Some(b'[') => {
            let end = bytes[2..]
                .iter()
                .position(|b| (0x40..=0x7e).contains(b))
                .map(|p| p + 2);
            let Some(end) = end else {
                return (None, s.len());
            };
            if bytes[end] != b'm' {
                return (None, end + 1);
            }
            let params = s[2..end]
                .split([';', ':'])
                .map(|p| p.parse::<u16>().unwrap_or(0))
                .collect::<Vec<_>>();
            let params = if s[2..end].is_empty() {
                Vec::new()
            } else {
                params
            };
            (Some(params), end + 1)
        }
        // An operating system command (a window title): to BEL or ESC \.
        Some(b']') => {
            let end = s[2..]
                .find(['\u{7}', '\u{1b}'])
                .map(|p| p + 2)
                .unwrap_or(s.len());
            let len = match bytes.get(end) {
                Some(0x07) => end + 1,
                Some(0x1b) if bytes.get(end + 1) == Some(&b'\\') => end + 2,
                _ => end,
            };
            (None, len.max(2))
        }
        // A character set choice (`ESC ( B`): the escape, its kind and the set.
        Some(b'(' | b')' | b'*' | b'+') => {
            (None, 2 + s[2..].chars().next().map_or(0, char::len_utf8))
        }
        Some(_) => (None, 1 + s[1..].chars().next().map_or(0, char::len_utf8)),
        None => (None, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_become_spans_and_text_is_escaped() {
        let cases = [
            ("plain <b>&\"'", "plain &lt;b&gt;&amp;&quot;&#39;"),
            (
                "\u{1b}[31mred\u{1b}[0m back",
                "<span class=\"f1\">red</span> back",
            ),
            (
                "\u{1b}[1;92mok\u{1b}[22m still green\u{1b}[m",
                "<span class=\"f10 b\">ok</span><span class=\"f10\"> still green</span>",
            ),
            (
                "\u{1b}[38;5;196mx\u{1b}[48;2;1;2;3my\u{1b}[39;49m",
                "<span style=\"color:#ff0000;\">x</span><span style=\"color:#ff0000;background:#010203;\">y</span>",
            ),
            ("\u{1b}[2K\u{1b}[1Gcleared", "cleared"),
            ("\u{1b}]0;title\u{7}after", "after"),
            ("cut off \u{1b}[3", "cut off "),
            (
                "\u{1b}[31m<script>alert(1)</script>",
                "<span class=\"f1\">&lt;script&gt;alert(1)&lt;/script&gt;</span>",
            ),
            ("lone \u{1b}", "lone "),
            ("\u{1b}(Bcharset", "charset"),
            ("\u{1b}[4mu\u{1b}[24m", "<span class=\"u\">u</span>"),
        ];
        for (input, want) in cases {
            assert_eq!(to_html(input), want, "{input:?}");
        }
    }

    #[test]
    fn the_style_at_the_end_reproduces_what_follows() {
        let cases = [
            ("plain\n", ""),
            ("\u{1b}[31mred\u{1b}[0m\n", ""),
            ("\u{1b}[1;31mstill red\n", "1;31"),
            ("\u{1b}[92;44mbright on blue\n", "92;44"),
            (
                "\u{1b}[3;4;38;5;196;48;2;1;2;3mx\n",
                "3;4;38;2;255;0;0;48;2;1;2;3",
            ),
        ];
        for (head, sgr) in cases {
            let (html, style) = to_html_and_style(head);
            assert_eq!(html, to_html(head));
            assert_eq!(style, sgr, "{head:?}");
            // Applied from none, it is the style the text ended in.
            assert_eq!(
                render(&format!("\u{1b}[{style}m")).1,
                render(head).1,
                "{head:?}"
            );
        }
    }
}
