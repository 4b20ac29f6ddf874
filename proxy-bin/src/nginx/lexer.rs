//! The nginx syntax: tokens with their positions, and directives with their blocks.

use super::*;

/// A place in one of the files read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    pub(super) file: usize,
    pub(super) line: usize,
    pub(super) col: usize,
}

/// One word of a directive, unescaped.
#[derive(Debug, Clone)]
pub(super) struct Word {
    pub(super) text: String,
    pub(super) pos: Pos,
}

/// `name args... ;` or `name args... { block }`.
#[derive(Debug, Clone)]
pub(super) struct Directive {
    pub(super) name: Word,
    pub(super) args: Vec<Word>,
    pub(super) block: Option<Vec<Directive>>,
}

impl Directive {
    pub(super) fn name(&self) -> &str {
        &self.name.text
    }
}

#[derive(Debug)]
pub(super) enum Tok {
    Word(Word),
    Semi(Pos),
    Open(Pos),
    Close(Pos),
}

pub(super) type LexError = (Pos, String);

/// nginx's lexical rules (`ngx_conf_read_token`): words end at whitespace, `;` or `{`; `}` and
/// `#` end nothing inside a word; a `#` starting a word comments out the rest of the line;
/// quotes start only at the beginning of a word and must be followed by a separator; `\`
/// makes the next character literal, and `\"`, `\'`, `\\`, `\t`, `\r`, `\n` are unescaped;
/// `${` continues a word (variable syntax).
pub(super) struct Lexer<'a> {
    pub(super) text: &'a [u8],
    pub(super) i: usize,
    pub(super) line: usize,
    pub(super) line_start: usize,
    pub(super) file: usize,
}

pub(super) fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

impl<'a> Lexer<'a> {
    pub(super) fn new(text: &'a str, file: usize) -> Self {
        Lexer {
            text: text.as_bytes(),
            i: 0,
            line: 1,
            line_start: 0,
            file,
        }
    }

    pub(super) fn pos(&self) -> Pos {
        Pos {
            file: self.file,
            line: self.line,
            col: self.i - self.line_start + 1,
        }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.text.get(self.i).copied()
    }

    pub(super) fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        if c == b'\n' {
            self.line += 1;
            self.line_start = self.i;
        }
        Some(c)
    }

    pub(super) fn next(&mut self) -> Result<Option<Tok>, LexError> {
        loop {
            match self.peek() {
                None => return Ok(None),
                Some(c) if is_space(c) => {
                    self.bump();
                }
                Some(b'#') => {
                    while let Some(c) = self.bump() {
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                Some(_) => break,
            }
        }
        let pos = self.pos();
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        match c {
            b';' => {
                self.bump();
                Ok(Some(Tok::Semi(pos)))
            }
            b'{' => {
                self.bump();
                Ok(Some(Tok::Open(pos)))
            }
            b'}' => {
                self.bump();
                Ok(Some(Tok::Close(pos)))
            }
            b'"' | b'\'' => self.quoted(c, pos).map(Some),
            _ => Ok(Some(self.bare(pos))),
        }
    }

    pub(super) fn quoted(&mut self, quote: u8, pos: Pos) -> Result<Tok, LexError> {
        self.bump();
        let start = self.i;
        loop {
            match self.bump() {
                None => {
                    return Err((
                        pos,
                        format!(
                            "unexpected end of file: the {} quote opened here is never closed",
                            if quote == b'"' { "double" } else { "single" }
                        ),
                    ))
                }
                Some(b'\\') => {
                    self.bump();
                }
                Some(c) if c == quote => break,
                Some(_) => {}
            }
        }
        let raw = &self.text[start..self.i - 1];
        match self.peek() {
            None => {}
            Some(c) if is_space(c) || matches!(c, b';' | b'{' | b')') => {}
            Some(c) => {
                return Err((
                    self.pos(),
                    format!(
                        "unexpected {:?} after a quoted string (expected a space, \";\" or \"{{\")",
                        char::from(c)
                    ),
                ))
            }
        }
        Ok(Tok::Word(Word {
            text: unescape(raw),
            pos,
        }))
    }

    pub(super) fn bare(&mut self, pos: Pos) -> Tok {
        let start = self.i;
        while let Some(c) = self.peek() {
            if is_space(c) || c == b';' || c == b'{' {
                break;
            }
            self.bump();
            match c {
                b'\\' => {
                    self.bump();
                }
                b'$' if self.peek() == Some(b'{') => {
                    self.bump();
                }
                _ => {}
            }
        }
        Tok::Word(Word {
            text: unescape(&self.text[start..self.i]),
            pos,
        })
    }
}

/// The unescaping nginx applies to every word.
pub(super) fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c == b'\\' {
            let replaced = match raw.get(i + 1) {
                Some(&e @ (b'"' | b'\'' | b'\\')) => Some(e),
                Some(b't') => Some(b'\t'),
                Some(b'r') => Some(b'\r'),
                Some(b'n') => Some(b'\n'),
                _ => None,
            };
            if let Some(r) = replaced {
                out.push(r);
                i += 2;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    // Words end at ASCII separators, so they are whole UTF-8 sequences; lossy never panics.
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the directives of one file, down to its closing braces.
pub(super) fn parse_block(
    lx: &mut Lexer<'_>,
    depth: usize,
    open: Option<Pos>,
) -> Result<Vec<Directive>, LexError> {
    let mut out = Vec::new();
    let mut words: Vec<Word> = Vec::new();
    let missing_semi = |words: &[Word]| {
        words.first().map_or(String::new(), |w| {
            format!(
                " (\"{}\" at {}:{} is missing its \";\")",
                w.text, w.pos.line, w.pos.col
            )
        })
    };
    loop {
        match lx.next()? {
            None => {
                if !words.is_empty() {
                    return Err((
                        lx.pos(),
                        format!(
                            "unexpected end of file, expecting \";\" or \"}}\"{}",
                            missing_semi(&words)
                        ),
                    ));
                }
                if let Some(o) = open {
                    return Err((
                        lx.pos(),
                        format!(
                            "unexpected end of file, expecting \"}}\" (to close the block opened at {}:{})",
                            o.line, o.col
                        ),
                    ));
                }
                return Ok(out);
            }
            Some(Tok::Word(w)) => words.push(w),
            Some(Tok::Semi(p)) => {
                if words.is_empty() {
                    return Err((p, "unexpected \";\"".into()));
                }
                let name = words.remove(0);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words),
                    block: None,
                });
            }
            Some(Tok::Open(p)) => {
                if words.is_empty() {
                    return Err((p, "unexpected \"{\"".into()));
                }
                if depth >= MAX_BLOCK_DEPTH {
                    return Err((p, format!("blocks nested more than {MAX_BLOCK_DEPTH} deep")));
                }
                let block = parse_block(lx, depth + 1, Some(p))?;
                let name = words.remove(0);
                out.push(Directive {
                    name,
                    args: std::mem::take(&mut words),
                    block: Some(block),
                });
            }
            Some(Tok::Close(p)) => {
                if !words.is_empty() {
                    return Err((p, format!("unexpected \"}}\"{}", missing_semi(&words))));
                }
                if open.is_none() {
                    return Err((p, "unexpected \"}\" (no block is open)".into()));
                }
                return Ok(out);
            }
        }
    }
}
