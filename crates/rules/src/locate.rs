//! Positions of sync-config problems in the YAML file.
//!
//! serde_yaml_ng only reports positions for syntax errors, and the parsed document keeps none,
//! so this is a small text scanner run after parsing: it finds the `bucket_definitions:`,
//! `streams:` and `with:` sections, the definition keys in them, and the scalar holding a
//! query's SQL. Each candidate scalar is decoded from the file text with the position of every
//! character it yields, and compared with the parsed SQL. That gives the query's position and,
//! for SQL syntax errors (`... at Line: 1, Column: 8`), the position of the offending character.
//!
//! Exact for plain scalars, single- and double-quoted scalars and literal (`|`) block scalars.
//! Folded (`>`) block scalars and multi-line plain scalars are decoded with the common folding
//! rules only (more-indented lines of a folded scalar are not special-cased); when a scalar
//! does not decode to the parsed SQL exactly, the query start is still reported but the
//! in-SQL position is not translated. Flow collections (`{...}`, `[...]`) are not searched:
//! issues inside them get the definition's position. A syntax error inside a CTE is reported by
//! the compiler against the query that reads the CTE, so its translated position can be off.

use crate::errors::{Location, RuleIssue};

/// One decoded character and where it came from (0-based line and character column).
type Mapped = Vec<(char, usize, usize)>;

/// A mapping key found in the file.
#[derive(Clone, Copy, Debug)]
struct Node {
    /// 0-based line of the key.
    line: usize,
    /// 0-based character column of the key.
    column: usize,
    /// Indentation (spaces) of the key.
    indent: usize,
    /// First line after the key's block.
    end: usize,
}

impl Node {
    fn location(&self) -> Location {
        Location {
            line: self.line + 1,
            column: self.column + 1,
        }
    }
}

/// Scans one sync config text.
pub(crate) struct Locator<'a> {
    lines: Vec<&'a str>,
}

fn indent_of(line: &str) -> usize {
    line.chars().take_while(|c| *c == ' ').count()
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// A mapping key at the start of `text`: the key and the character offset after its `:`.
fn key_at(text: &str) -> Option<(String, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let (key, after) = match chars.first()? {
        q @ ('"' | '\'') => {
            let close = chars.iter().skip(1).position(|c| c == q)? + 1;
            (chars[1..close].iter().collect::<String>(), close + 1)
        }
        '-' | '[' | '{' | '#' | '|' | '>' => return None,
        _ => {
            let colon = (0..chars.len()).find(|&i| chars[i] == ':' && chars.get(i + 1).is_none_or(|c| *c == ' '))?;
            (chars[..colon].iter().collect::<String>().trim_end().to_string(), colon)
        }
    };
    (chars.get(after) == Some(&':') && chars.get(after + 1).is_none_or(|c| *c == ' ')).then_some((key, after + 1))
}

impl<'a> Locator<'a> {
    pub(crate) fn new(yaml: &'a str) -> Self {
        Locator {
            lines: yaml.lines().collect(),
        }
    }

    /// Fills in `location` of every issue that has none yet, where it can be found.
    pub(crate) fn attach(&self, issues: &mut [RuleIssue]) {
        for issue in issues.iter_mut().filter(|i| i.location.is_none()) {
            issue.location = self.locate(issue);
        }
    }

    fn locate(&self, issue: &RuleIssue) -> Option<Location> {
        let Some(definition) = &issue.definition else {
            return self.root_location(&issue.message);
        };
        let node = self.definition(definition)?;
        if let Some(sql) = &issue.query {
            if let Some(at) = self.query_location(node, sql, &issue.message) {
                return Some(at);
            }
        }
        // A key the message names: quoted (`Unknown key 'x'`), else a bare word (`Invalid priority`).
        let mut words = quoted_words(&issue.message);
        words.extend(issue.message.split_whitespace().map(bare_word));
        let key = words.iter().find_map(|w| self.child(node, w));
        Some(key.unwrap_or(node).location())
    }

    /// Issues about the whole file: the top-level or `config:` key the message names.
    fn root_location(&self, message: &str) -> Option<Location> {
        let mut words = quoted_words(message);
        if message.starts_with("Storage version") {
            words.push("storage_version".into());
        }
        // Then any word of the message that is a key: `config.edition must be ...`,
        // `Enabling unstable_sqlite_expression_engine requires ...`, `Sync streams require ...`.
        words.extend(
            message
                .split_whitespace()
                .map(|w| bare_word(w.strip_prefix("config.").unwrap_or(w))),
        );
        let config = self.top("config");
        words.iter().find_map(|w| {
            let under_config = config.and_then(|c| self.child(c, w));
            under_config.or_else(|| self.top(w)).map(|n| n.location())
        })
    }

    /// The key of a bucket definition, stream or CTE named as in [`RuleIssue::definition`]:
    /// `name`, `stream.with.cte` or `with.cte`.
    fn definition(&self, name: &str) -> Option<Node> {
        let direct = ["bucket_definitions", "streams"]
            .iter()
            .find_map(|section| self.top(section).and_then(|s| self.child(s, name)));
        if direct.is_some() {
            return direct;
        }
        if let Some(cte) = name.strip_prefix("with.") {
            return self.top("with").and_then(|w| self.child(w, cte));
        }
        let (stream, cte) = name.split_once(".with.")?;
        let stream = self.top("streams").and_then(|s| self.child(s, stream))?;
        self.child(stream, "with").and_then(|w| self.child(w, cte))
    }

    fn top(&self, key: &str) -> Option<Node> {
        self.keys_in(0, self.lines.len(), None)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, n)| n)
    }

    fn child(&self, parent: Node, key: &str) -> Option<Node> {
        self.keys_in(parent.line + 1, parent.end, Some(parent.indent))
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, n)| n)
    }

    /// The keys of the block mapping in lines `start..end` (indented more than `parent`).
    fn keys_in(&self, start: usize, end: usize, parent: Option<usize>) -> Vec<(String, Node)> {
        let first = (start..end).find(|&i| !is_blank(self.lines[i]));
        let Some(indent) = first.map(|i| indent_of(self.lines[i])) else {
            return Vec::new();
        };
        if parent.is_some_and(|p| indent <= p) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in start..end {
            let line = self.lines[i];
            if is_blank(line) || indent_of(line) != indent {
                continue;
            }
            let Some((key, _)) = key_at(&line[indent..]) else {
                continue;
            };
            let end = self.block_end(i, indent, end);
            out.push((
                key,
                Node {
                    line: i,
                    column: indent,
                    indent,
                    end,
                },
            ));
        }
        out
    }

    /// The first line after line `i` that is indented no more than `indent` (or `limit`).
    fn block_end(&self, i: usize, indent: usize, limit: usize) -> usize {
        (i + 1..limit)
            .find(|&j| !is_blank(self.lines[j]) && indent_of(self.lines[j]) <= indent)
            .unwrap_or(limit)
    }

    /// Where `sql` is in the definition's block; for an SQL syntax error, the offending character.
    fn query_location(&self, node: Node, sql: &str, message: &str) -> Option<Location> {
        let mut inexact = None;
        for (line, column) in self.value_starts(node) {
            let Some(mapped) = self.decode(line, column) else {
                continue;
            };
            let text: String = mapped.iter().map(|(c, _, _)| c).collect();
            let start = Location {
                line: line + 1,
                column: column + 1,
            };
            if text == sql {
                let at = sql_error_offset(sql, message).and_then(|i| position_at(&mapped, i));
                return Some(at.unwrap_or(start));
            }
            if inexact.is_none() && text.trim() == sql.trim() {
                inexact = Some(start);
            }
        }
        inexact
    }

    /// Start positions of the scalar values in a definition's lines: after `key:` and `- `.
    fn value_starts(&self, node: Node) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for i in node.line..node.end {
            let line = self.lines[i];
            let chars: Vec<char> = line.chars().collect();
            let mut pos = indent_of(line);
            loop {
                let rest: String = chars[pos.min(chars.len())..].iter().collect();
                if rest == "-" || rest.starts_with("- ") {
                    pos += 1 + rest[1..].chars().take_while(|c| *c == ' ').count();
                    continue;
                }
                if let Some((_, after)) = key_at(&rest) {
                    pos += after + rest.chars().skip(after).take_while(|c| *c == ' ').count();
                    continue;
                }
                break;
            }
            if pos < chars.len() && chars[pos] != '#' {
                out.push((i, pos));
            }
        }
        out
    }

    /// Decodes the scalar starting at (`line`, `column`), with each character's position.
    fn decode(&self, line: usize, column: usize) -> Option<Mapped> {
        let chars: Vec<char> = self.lines[line].chars().collect();
        match chars.get(column)? {
            '\'' => self.quoted(line, column, false),
            '"' => self.quoted(line, column, true),
            '|' | '>' => self.block(line, column),
            '[' | '{' | '&' | '*' | '!' => None,
            _ => Some(self.plain(line, column)),
        }
    }

    /// A plain scalar: the rest of the line (up to a ` #` comment), then more-indented
    /// continuation lines folded with spaces.
    fn plain(&self, line: usize, column: usize) -> Mapped {
        let parent = indent_of(self.lines[line]);
        let mut out: Mapped = Vec::new();
        let mut pending_breaks = 0;
        for i in line..self.lines.len() {
            let chars: Vec<char> = self.lines[i].chars().collect();
            let from = if i == line { column } else { indent_of(self.lines[i]) };
            if i > line {
                if chars.iter().all(|c| *c == ' ') {
                    pending_breaks += 1;
                    continue;
                }
                if from <= parent || chars[from] == '#' {
                    break;
                }
                let sep = if pending_breaks == 0 {
                    vec![' ']
                } else {
                    vec!['\n'; pending_breaks]
                };
                out.extend(sep.into_iter().map(|c| (c, i, from)));
                pending_breaks = 0;
            }
            let mut end = chars.len();
            if let Some(c) = (from..chars.len()).find(|&j| chars[j] == '#' && j > from && chars[j - 1] == ' ') {
                end = c;
            }
            while end > from && chars[end - 1] == ' ' {
                end -= 1;
            }
            out.extend((from..end).map(|j| (chars[j], i, j)));
        }
        out
    }

    /// A single- or double-quoted scalar, possibly over several lines.
    fn quoted(&self, line: usize, column: usize, double: bool) -> Option<Mapped> {
        let quote = if double { '"' } else { '\'' };
        let mut out: Mapped = Vec::new();
        let mut i = line;
        let mut j = column + 1;
        loop {
            let chars: Vec<char> = self.lines.get(i)?.chars().collect();
            while j < chars.len() {
                let c = chars[j];
                if c == quote && !double && chars.get(j + 1) == Some(&'\'') {
                    out.push(('\'', i, j));
                    j += 2;
                } else if c == quote {
                    return Some(out);
                } else if c == '\\' && double {
                    if j + 1 == chars.len() {
                        // An escaped line break joins the lines without a space.
                        j += 1;
                        break;
                    }
                    let (decoded, len) = unescape(&chars[j + 1..])?;
                    out.push((decoded, i, j));
                    j += 1 + len;
                } else {
                    out.push((c, i, j));
                    j += 1;
                }
            }
            let escaped_break = double && chars.last() == Some(&'\\') && j == chars.len();
            if !escaped_break {
                while out.last().is_some_and(|(c, l, _)| *c == ' ' && *l == i) {
                    out.pop();
                }
            }
            // Line folding: one break is a space, each further empty line a newline.
            let mut next = i + 1;
            let mut empty = 0;
            while self.lines.get(next).is_some_and(|l| l.trim().is_empty()) {
                empty += 1;
                next += 1;
            }
            let text = self.lines.get(next)?;
            let start = text.chars().take_while(|c| *c == ' ' || *c == '\t').count();
            if !escaped_break {
                let sep = if empty == 0 { vec![' '] } else { vec!['\n'; empty] };
                out.extend(sep.into_iter().map(|c| (c, next, start)));
            }
            i = next;
            j = start;
        }
    }

    /// A `|` or `>` block scalar whose header is at (`line`, `column`).
    fn block(&self, line: usize, column: usize) -> Option<Mapped> {
        let header: Vec<char> = self.lines[line].chars().skip(column).collect();
        let folded = header[0] == '>';
        let mut chomp = ' ';
        let mut explicit = None;
        let mut k = 1;
        while let Some(c) = header.get(k) {
            match c {
                '+' | '-' => chomp = *c,
                d @ '1'..='9' => explicit = d.to_digit(10).map(|d| d as usize),
                ' ' => break,
                _ => return None,
            }
            k += 1;
        }
        if header[k..]
            .iter()
            .collect::<String>()
            .trim_start()
            .chars()
            .next()
            .is_some_and(|c| c != '#')
        {
            return None;
        }
        let parent = indent_of(self.lines[line]);
        let first = (line + 1..self.lines.len()).find(|&i| !self.lines[i].trim().is_empty());
        let indent = match (explicit, first) {
            (Some(n), _) => parent + n,
            (None, Some(i)) => indent_of(self.lines[i]),
            (None, None) => return Some(Vec::new()),
        };
        if indent <= parent && explicit.is_none() {
            return Some(Vec::new());
        }
        let mut body: Vec<(usize, Vec<char>)> = Vec::new();
        for i in line + 1..self.lines.len() {
            let l = self.lines[i];
            if !l.trim().is_empty() && indent_of(l) < indent {
                break;
            }
            body.push((i, l.chars().skip(indent).collect()));
        }
        Some(join_block(body, indent, folded, chomp))
    }
}

/// Joins block-scalar content lines: newlines (`|`) or folded spaces (`>`), then chomping.
/// `indent` is the block's indentation, which the content lines were stripped of.
fn join_block(mut body: Vec<(usize, Vec<char>)>, indent: usize, folded: bool, chomp: char) -> Mapped {
    let trailing = body.iter().rev().take_while(|(_, l)| l.iter().all(|c| *c == ' ')).count();
    let kept_trailing = body.split_off(body.len() - trailing);
    let mut out: Mapped = Vec::new();
    let mut prev_empty = true;
    for (n, (i, chars)) in body.iter().enumerate() {
        let empty = chars.is_empty();
        if n > 0 {
            // Folding: a break between two text lines is a space; empty lines are newlines.
            if !folded || empty || prev_empty {
                if !(folded && empty && !prev_empty) {
                    out.push(('\n', *i, indent));
                }
            } else {
                out.push((' ', *i, indent));
            }
        }
        out.extend(chars.iter().enumerate().map(|(j, c)| (*c, *i, indent + j)));
        prev_empty = empty;
    }
    if !body.is_empty() && chomp != '-' {
        let last = body.last().map_or(0, |(i, _)| *i);
        out.push(('\n', last, 0));
        if chomp == '+' {
            out.extend(kept_trailing.iter().map(|(i, _)| ('\n', *i, 0)));
        }
    }
    out
}

/// Decodes one double-quoted escape (the characters after `\`): the character and how many
/// characters the escape used.
fn unescape(rest: &[char]) -> Option<(char, usize)> {
    let hex = |n: usize| {
        let digits: String = rest.get(1..=n)?.iter().collect();
        u32::from_str_radix(&digits, 16).ok().and_then(char::from_u32).map(|c| (c, n + 1))
    };
    Some(match rest.first()? {
        'n' => ('\n', 1),
        't' | '\t' => ('\t', 1),
        'r' => ('\r', 1),
        '0' => ('\0', 1),
        'x' => return hex(2),
        'u' => return hex(4),
        'U' => return hex(8),
        c @ ('"' | '\\' | '/' | ' ') => (*c, 1),
        _ => return None,
    })
}

/// Words in single quotes in a message (`Unknown key 'x'`), which often name a key.
fn quoted_words(message: &str) -> Vec<String> {
    message.split('\'').skip(1).step_by(2).map(str::to_string).collect()
}

/// A message word without surrounding punctuation (`priority,` -> `priority`).
fn bare_word(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric() && c != '_').to_string()
}

/// The character offset in `sql` of an sqlparser position (`... at Line: L, Column: C`).
pub(crate) fn sql_error_offset(sql: &str, message: &str) -> Option<usize> {
    let (_, tail) = message.rsplit_once(" at Line: ")?;
    let (line, column) = tail.split_once(", Column: ")?;
    let line: usize = line.trim().parse().ok()?;
    let column: usize = column.trim().parse().ok()?;
    let mut offset = 0;
    for (n, text) in sql.split('\n').enumerate() {
        if n + 1 == line {
            return Some(offset + column.checked_sub(1)?);
        }
        offset += text.chars().count() + 1;
    }
    None
}

/// File position of the decoded character at `offset` (one past the end: after the last one).
fn position_at(mapped: &Mapped, offset: usize) -> Option<Location> {
    match mapped.get(offset) {
        Some((_, line, column)) => Some(Location {
            line: line + 1,
            column: column + 1,
        }),
        None if offset == mapped.len() => mapped.last().map(|(_, line, column)| Location {
            line: line + 1,
            column: column + 2,
        }),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SyncRules, SyncRulesOptions};

    fn issues(yaml: &str) -> Vec<RuleIssue> {
        match SyncRules::parse(yaml, &SyncRulesOptions::default()) {
            Ok(r) => r.warnings().to_vec(),
            Err(e) => e.errors,
        }
    }

    fn at(line: usize, column: usize) -> Option<Location> {
        Some(Location { line, column })
    }

    /// The location of the only issue whose message contains `needle`.
    fn location_of(yaml: &str, needle: &str) -> Option<Location> {
        let all = issues(yaml);
        let found: Vec<&RuleIssue> = all.iter().filter(|i| i.message.contains(needle)).collect();
        assert_eq!(found.len(), 1, "{needle:?} in {all:?}");
        found[0].location
    }

    #[test]
    fn plain_scalar_sql_error_points_at_the_character() {
        let yaml = "bucket_definitions:\n  b:\n    data:\n      - SELECT * FROM t WHER x = 1 # comment\n";
        // `x` is column 22 of the SQL, which starts at column 9.
        assert_eq!(location_of(yaml, "found: x"), at(4, 30));
        let issue = &issues(yaml)[0];
        assert!(issue.to_string().starts_with("line 4, column 30: b: Expected"), "{issue}");
    }

    #[test]
    fn quoted_scalars() {
        // `''` is one character of SQL but two in the file.
        let yaml = "bucket_definitions:\n  b:\n    data:\n      - 'SELECT ''a'' AS n FROM t WHER x'\n";
        assert_eq!(location_of(yaml, "found: x"), at(4, 40));
        let yaml = "bucket_definitions:\n  b:\n    data: [\"SELECT \\\"x\\\" FROM t WHERE\"]\n";
        // Flow sequences are not searched: the definition key.
        assert_eq!(location_of(yaml, "Expected"), at(2, 3));
        let yaml = "bucket_definitions:\n  b:\n    data:\n      - \"SELECT \\\"x\\\" FROM t WHER y\"\n";
        assert_eq!(location_of(yaml, "found: y"), at(4, 35));
        // A quoted scalar folded over two lines.
        let yaml = "bucket_definitions:\n  b:\n    data:\n      - 'SELECT id\n        FROM t WHER x'\n";
        assert_eq!(location_of(yaml, "found: x"), at(5, 21));
    }

    #[test]
    fn block_scalars() {
        let yaml = "bucket_definitions:\n  b:\n    parameters: |\n      SELECT id AS u\n      FROM users WHER x\n    data: []\n";
        assert_eq!(location_of(yaml, "found: x"), at(5, 23));
        let yaml = "streams:\n  s:\n    query: >-\n      SELECT * FROM t\n      WHER x\nconfig:\n  edition: 3\n";
        assert_eq!(location_of(yaml, "found: x"), at(5, 12));
        let yaml = "config:\n  edition: 3\nstreams:\n  s:\n    query: |2\n        SELECT * FROM t WHER x\n";
        assert_eq!(location_of(yaml, "found: x"), at(6, 30));
    }

    #[test]
    fn definitions_keys_and_root_issues() {
        let yaml = "bucket_definitions:\n  ok:\n    data: []\n    priority: 7\n  \"bad one\":\n    priority: 1\n    extra: 1\n";
        assert_eq!(location_of(yaml, "Invalid priority"), at(4, 5));
        assert_eq!(location_of(yaml, "required property 'data'"), at(5, 3));
        assert_eq!(location_of(yaml, "Unknown key 'extra'"), at(7, 5));
        let yaml = "config:\n  edition: 7\nbucket_definitions:\n  b:\n    data: []\nfoo: 1\n";
        assert_eq!(location_of(yaml, "config.edition"), at(2, 3));
        assert_eq!(location_of(yaml, "top-level key 'foo'"), at(6, 1));
        let yaml = "config:\n  edition: 3\nstreams:\n  s:\n    with:\n      unused: SELECT * FROM x\n    query: SELECT * FROM t\n";
        assert_eq!(location_of(yaml, "isn't referenced"), at(6, 7));
    }

    #[test]
    fn yaml_syntax_errors_have_positions() {
        let yaml = "bucket_definitions:\n  b:\n    data: [\n  - x: : y\n";
        let loc = location_of(yaml, "Invalid YAML");
        assert!(loc.is_some_and(|l| l.line >= 3), "{loc:?}");
    }

    #[test]
    fn sql_offsets() {
        assert_eq!(
            sql_error_offset("SELECT\n  x y", "Expected: end, found: y at Line: 2, Column: 5"),
            Some(11)
        );
        assert_eq!(sql_error_offset("SELECT x", "no position"), None);
        assert_eq!(sql_error_offset("SELECT x", "at Line: 3, Column: 1"), None);
    }

    #[test]
    fn definition_of_bucket_ids() {
        let yaml = "config:\n  edition: 3\nstreams:\n  lists:\n    auto_subscribe: true\n    query: SELECT * FROM lists\n  list_items:\n    query: SELECT * FROM items WHERE list = subscription.parameter('l')\n";
        let rules = SyncRules::parse(yaml, &SyncRulesOptions::default())
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(rules.definition_of("1#lists|0[]"), Some("lists"));
        assert_eq!(rules.definition_of("1#list_items|0[\"a\"]"), Some("list_items"));
        assert_eq!(rules.definition_of("nope[]"), None);
    }
}
