//! A strict, bounded parser for CoRE Link Format (RFC 6690), the body of an LwM2M
//! registration: `</3/0>;obs;rt="oma.device",</3303/0/5700>;ct=0`.

/// Most links accepted in one document.
pub const MAX_LINKS: usize = 4096;

/// One `<uri>;attr;attr=value` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub uri: String,
    /// Attributes in document order; a bare attribute (`obs`) has no value.
    pub attrs: Vec<(String, Option<String>)>,
}

impl Link {
    /// The value of the first attribute called `name`; `Some(None)` for a bare attribute.
    pub fn attr(&self, name: &str) -> Option<Option<&str>> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }
}

/// Why a link-format document was refused, with the byte offset where parsing stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("link-format error at byte {offset}: {message}")]
pub struct ParseError {
    pub offset: usize,
    pub message: &'static str,
}

/// Parses a whole document. An empty (or all-blank) document is an empty list.
pub fn parse(text: &str) -> Result<Vec<Link>, ParseError> {
    Ok(parse_spans(text)?.into_iter().map(|(_, l)| l).collect())
}

/// [`parse`], each link with the bytes of `text` it was read from (`<uri>` and its
/// attributes as the document wrote them), so that a document can be rewritten without
/// some of its links and the others kept as they were.
pub fn parse_spans(text: &str) -> Result<Vec<(std::ops::Range<usize>, Link)>, ParseError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut links = Vec::new();
    p.skip_ws();
    if p.at_end() {
        return Ok(links);
    }
    loop {
        if links.len() == MAX_LINKS {
            return Err(p.err("too many links"));
        }
        let start = p.i;
        let link = p.link()?;
        // The blanks `link` read past its last attribute are not the link's.
        let mut end = p.i;
        while end > start && matches!(p.s[end - 1], b' ' | b'\t' | b'\r' | b'\n') {
            end -= 1;
        }
        links.push((start..end, link));
        p.skip_ws();
        if p.at_end() {
            return Ok(links);
        }
        p.expect(b',', "expected ',' between links")?;
        p.skip_ws();
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, message: &'static str) -> ParseError {
        ParseError {
            offset: self.i,
            message,
        }
    }
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, b: u8, message: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(message))
        }
    }
    fn text(&self, from: usize) -> Result<String, ParseError> {
        std::str::from_utf8(&self.s[from..self.i])
            .map(str::to_owned)
            .map_err(|_| self.err("invalid UTF-8"))
    }

    fn link(&mut self) -> Result<Link, ParseError> {
        self.expect(b'<', "expected '<' to start a link")?;
        let start = self.i;
        while let Some(c) = self.peek() {
            match c {
                b'>' => break,
                b'<' | b'"' | b' ' | b',' | b';' | 0..=0x1F | 0x7F => {
                    return Err(self.err("invalid character in URI"));
                }
                _ => self.i += 1,
            }
        }
        let uri = self.text(start)?;
        self.expect(b'>', "unterminated '<' in link")?;
        let mut attrs = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() != Some(b';') {
                break;
            }
            self.i += 1;
            self.skip_ws();
            attrs.push(self.param()?);
        }
        Ok(Link { uri, attrs })
    }

    fn param(&mut self) -> Result<(String, Option<String>), ParseError> {
        let start = self.i;
        while matches!(self.peek(), Some(c) if is_token_char(c) && c != b'=') {
            self.i += 1;
        }
        if self.i == start {
            return Err(self.err("expected an attribute name"));
        }
        let name = self.text(start)?;
        self.skip_ws();
        if self.peek() != Some(b'=') {
            return Ok((name, None));
        }
        self.i += 1;
        self.skip_ws();
        let value = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            let start = self.i;
            while matches!(self.peek(), Some(c) if is_token_char(c)) {
                self.i += 1;
            }
            if self.i == start {
                return Err(self.err("expected an attribute value"));
            }
            self.text(start)?
        };
        Ok((name, Some(value)))
    }

    fn quoted(&mut self) -> Result<String, ParseError> {
        self.i += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or_else(|| self.err("dangling escape"))?;
                    out.push(c);
                    self.i += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"))
    }
}

/// Characters allowed in an unquoted attribute name or value (RFC 6690 ptoken, widened to
/// what LwM2M clients send, such as `ct=11543` and `ver=1.0`).
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'/'
                | b':'
                | b'<'
                | b'='
                | b'>'
                | b'?'
                | b'@'
                | b'['
                | b']'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each link's span is its text as written, whatever the blanks around the commas.
    #[test]
    fn spans_are_the_links_as_written() {
        let text = r#" </3/0>;obs;rt="oma.device" ,</5/0>;ct="0 11542",	</6/0>"#;
        let spans: Vec<&str> = parse_spans(text)
            .unwrap()
            .into_iter()
            .map(|(r, _)| &text[r])
            .collect();
        assert_eq!(
            spans,
            [
                r#"</3/0>;obs;rt="oma.device""#,
                r#"</5/0>;ct="0 11542""#,
                "</6/0>"
            ]
        );
    }

    #[test]
    fn parses_lwm2m_registration_bodies() {
        let links =
            parse(r#"</>;rt="oma.lwm2m";ct=11543, </1/0>,</3/0>;obs;rt="oma.device", </3303/0/5700>;ct=0;if="sensor, x""#)
                .unwrap();
        assert_eq!(links.len(), 4);
        assert_eq!(links[0].uri, "/");
        assert_eq!(links[0].attr("rt"), Some(Some("oma.lwm2m")));
        assert_eq!(links[0].attr("ct"), Some(Some("11543")));
        assert_eq!(links[1].attrs, vec![]);
        assert_eq!(links[2].attr("obs"), Some(None));
        assert_eq!(links[3].attr("if"), Some(Some("sensor, x")));
        assert_eq!(links[3].attr("rt"), None);
    }

    #[test]
    fn empty_document_is_empty() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("  \n").unwrap(), vec![]);
    }

    #[test]
    fn escapes_in_quoted_values() {
        let l = parse(r#"<a>;title="say \"hi\"""#).unwrap();
        assert_eq!(l[0].attr("title"), Some(Some(r#"say "hi""#)));
    }

    #[test]
    fn malformed_documents_are_refused_with_offset() {
        let cases: &[(&str, usize)] = &[
            ("/3/0", 0),
            ("</3/0", 5),
            ("</3/0>,", 7),
            ("</3/0> </4/0>", 7),
            ("</3/0>;", 7),
            ("</3/0>;rt=", 10),
            ("</3/0>;rt=\"x", 12),
            ("</3 0>", 3),
            ("</3/0>;=x", 7),
        ];
        for (text, offset) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.offset, *offset, "{text:?}: {e}");
        }
    }

    #[test]
    fn too_many_links() {
        let doc = vec!["<a>"; MAX_LINKS + 1].join(",");
        assert_eq!(parse(&doc).unwrap_err().message, "too many links");
        let doc = vec!["<a>"; MAX_LINKS].join(",");
        assert_eq!(parse(&doc).unwrap().len(), MAX_LINKS);
    }
}
