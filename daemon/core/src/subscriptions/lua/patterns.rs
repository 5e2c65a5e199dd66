//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` for rule files: Lua 5.4's
//! pattern matcher (`lstrlib.c`) ported to Rust, with its work counted.
//!
//! Lua's own matcher is C: the instruction hook never runs inside it, and a pattern that
//! backtracks (`string.rep("a", 300):find(string.rep("a*", 30) .. "b")`) runs for longer
//! than anyone waits, holding its thread. This port behaves as Lua 5.4's (same results,
//! same error messages) but charges every matching step (a call of the matcher, one
//! character tried by a repetition or `%b`, a back-reference compared, a position tried by
//! a plain find) to the call's instruction budget and checks the call's time limit every
//! [`CHARGE_STEP`] steps; over either, the call fails like a runaway Lua loop. Results are
//! bounded by the state's memory limit (gsub builds its result outside the Lua heap).

use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use super::Meter;

/// Matching steps counted between two charges to the meter.
const CHARGE_STEP: u64 = 256;
/// Lua's `MAXCCALLS`: nesting of the recursive matcher ("pattern too complex").
const MAX_DEPTH: u32 = 200;
/// Lua's `LUA_MAXCAPTURES`.
const MAX_CAPTURES: usize = 32;
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;
/// Characters that make a pattern more than a plain string (`lstrlib.c` `SPECIALS`).
const SPECIALS: &[u8] = b"^$*+?.([%-";

/// An error as Lua's matcher raises it (the message, without position).
type R<T> = Result<T, String>;

/// What the work of one match is charged to.
type Charge<'a> = &'a mut dyn FnMut(u64) -> R<()>;

/// One capture: a substring (start, end) or a position (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cap {
    Str(usize, usize),
    Pos(usize),
}

/// `lstrlib.c`'s `MatchState`, over byte offsets instead of pointers.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: u32,
    level: usize,
    capture: [(usize, isize); MAX_CAPTURES],
    pending: u64,
    charge: Charge<'a>,
}

fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace: also \v, which Rust's is_ascii_whitespace leaves out.
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        // Deprecated, but Lua 5.4 still has it.
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_uppercase() { !res } else { res }
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], charge: Charge<'a>) -> Matcher<'a> {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            capture: [(0, 0); MAX_CAPTURES],
            pending: 0,
            charge,
        }
    }

    /// The pattern byte at `i`, or 0 past the end (C reads the string's terminator).
    fn pat_at(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    fn src_at(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn tick(&mut self, n: u64) -> R<()> {
        self.pending += n;
        if self.pending >= CHARGE_STEP {
            let n = std::mem::take(&mut self.pending);
            (self.charge)(n)?;
        }
        Ok(())
    }

    /// Charges what is left (at the end of a match).
    fn settle(&mut self) -> R<()> {
        let n = std::mem::take(&mut self.pending);
        if n > 0 { (self.charge)(n) } else { Ok(()) }
    }

    fn class_end(&self, p: usize) -> R<usize> {
        let c = self.pat_at(p);
        let mut p = p + 1;
        match c {
            b'%' => {
                if p >= self.pat.len() {
                    return Err("malformed pattern (ends with '%')".into());
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.pat_at(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return Err("malformed pattern (missing ']')".into());
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == b'%' && p < self.pat.len() {
                        p += 1;
                    }
                    if self.pat_at(p) == b']' {
                        break;
                    }
                }
                Ok(p + 1)
            }
            _ => Ok(p),
        }
    }

    /// `[set]` with `p` at `[` and `ec` at its `]`.
    fn bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.pat_at(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                break;
            }
            let pc = self.pat[p];
            if pc == b'%' {
                p += 1;
                if match_class(c, self.pat_at(p)) {
                    return sig;
                }
            } else if self.pat_at(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pat[p - 2] <= c && c <= self.pat[p] {
                    return sig;
                }
            } else if pc == c {
                return sig;
            }
        }
        !sig
    }

    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            b'%' => match_class(c, self.pat_at(p + 1)),
            b'[' => self.bracket_class(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return Err("malformed pattern (missing arguments to '%b')".into());
        }
        if s >= self.src.len() || self.src[s] != self.pat[p] {
            return Ok(None);
        }
        let (open, close) = (self.pat[p], self.pat[p + 1]);
        let mut depth = 1u32;
        let mut s = s + 1;
        while s < self.src.len() {
            self.tick(1)?;
            let c = self.src[s];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(s + 1));
                }
            } else if c == open {
                depth += 1;
            }
            s += 1;
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        let mut i = 0;
        while self.single_match(s + i, p, ep) {
            i += 1;
            self.tick(1)?;
        }
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            }
            if !self.single_match(s, p, ep) {
                return Ok(None);
            }
            s += 1;
            self.tick(1)?;
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> R<Option<usize>> {
        if self.level >= MAX_CAPTURES {
            return Err("too many captures".into());
        }
        self.capture[self.level] = (s, what);
        self.level += 1;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.level -= 1;
        }
        Ok(r)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        let l = (0..self.level)
            .rev()
            .find(|&l| self.capture[l].1 == CAP_UNFINISHED)
            .ok_or_else(|| "invalid pattern capture".to_string())?;
        self.capture[l].1 = (s - self.capture[l].0) as isize;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.capture[l].1 = CAP_UNFINISHED;
        }
        Ok(r)
    }

    fn check_capture(&self, digit: u8) -> R<usize> {
        let l = i32::from(digit) - i32::from(b'1');
        if l < 0 || l as usize >= self.level || self.capture[l as usize].1 == CAP_UNFINISHED {
            return Err(format!("invalid capture index %{}", l + 1));
        }
        Ok(l as usize)
    }

    fn match_capture(&mut self, s: usize, digit: u8) -> R<Option<usize>> {
        let l = self.check_capture(digit)?;
        let (init, len) = self.capture[l];
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        self.tick(1 + len as u64 / 16)?;
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    fn do_match(&mut self, mut s: usize, mut p: usize) -> R<Option<usize>> {
        if self.depth == 0 {
            return Err("pattern too complex".into());
        }
        self.depth -= 1;
        self.tick(1)?;
        let result = loop {
            if p == self.pat.len() {
                break Some(s);
            }
            match self.pat[p] {
                b'(' => {
                    break if self.pat_at(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)?
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => break (s == self.src.len()).then_some(s),
                b'%' if self.pat_at(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(e) => {
                        s = e;
                        p += 4;
                    }
                    None => break None,
                },
                b'%' if self.pat_at(p + 1) == b'f' => {
                    p += 2;
                    if self.pat_at(p) != b'[' {
                        return Err("missing '[' after '%f' in pattern".into());
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src_at(s - 1) };
                    if !self.bracket_class(previous, p, ep - 1)
                        && self.bracket_class(self.src_at(s), p, ep - 1)
                    {
                        p = ep;
                    } else {
                        break None;
                    }
                }
                b'%' if self.pat_at(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.pat_at(p + 1))? {
                        Some(e) => {
                            s = e;
                            p += 2;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let after = self.pat_at(ep);
                    if !self.single_match(s, p, ep) {
                        if matches!(after, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        break None;
                    }
                    match after {
                        b'?' => match self.do_match(s + 1, ep + 1)? {
                            Some(r) => break Some(r),
                            None => p = ep + 1,
                        },
                        b'+' => break self.max_expand(s + 1, p, ep)?,
                        b'*' => break self.max_expand(s, p, ep)?,
                        b'-' => break self.min_expand(s, p, ep)?,
                        _ => {
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        };
        self.depth += 1;
        Ok(result)
    }

    /// Starts a new attempt (`reprepstate`).
    fn reset(&mut self) {
        self.level = 0;
        self.depth = MAX_DEPTH;
    }

    fn get_capture(&self, i: usize, s: usize, e: usize) -> R<Cap> {
        if i >= self.level {
            if i != 0 {
                return Err(format!("invalid capture index %{}", i + 1));
            }
            return Ok(Cap::Str(s, e));
        }
        let (init, len) = self.capture[i];
        match len {
            CAP_UNFINISHED => Err("unfinished capture".into()),
            CAP_POSITION => Ok(Cap::Pos(init + 1)),
            len => Ok(Cap::Str(init, init + len as usize)),
        }
    }

    /// The captures of a match of `s..e` (the whole match when the pattern has none and
    /// `whole` says so).
    fn captures(&self, s: usize, e: usize, whole: bool) -> R<Vec<Cap>> {
        let n = if self.level == 0 && whole {
            1
        } else {
            self.level
        };
        (0..n).map(|i| self.get_capture(i, s, e)).collect()
    }
}

/// `posrelatI`: a 1-based, possibly negative start position → 0-based offset (may be
/// past the end).
fn start_offset(init: i64, len: usize) -> usize {
    let pos = if init > 0 {
        usize::try_from(init).unwrap_or(usize::MAX)
    } else if init == 0 || init.unsigned_abs() > len as u64 {
        1
    } else {
        len - init.unsigned_abs() as usize + 1
    };
    pos - 1
}

/// A plain substring search, charged one step per position tried.
fn plain_find(src: &[u8], pat: &[u8], from: usize, charge: Charge<'_>) -> R<Option<usize>> {
    if pat.is_empty() {
        return Ok(Some(from));
    }
    if pat.len() > src.len() - from {
        return Ok(None);
    }
    let cost = 1 + pat.len() as u64 / 16;
    let mut pending = 0u64;
    for at in from..=src.len() - pat.len() {
        pending += cost;
        if pending >= CHARGE_STEP {
            charge(std::mem::take(&mut pending))?;
        }
        if src[at..at + pat.len()] == *pat {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// What `find` or `match` found: the match's span and its captures.
struct Found {
    start: usize,
    end: usize,
    caps: Vec<Cap>,
}

/// `str_find_aux`: `find` (with `plain`) or `match`.
fn find_aux(
    src: &[u8],
    pat: &[u8],
    init: i64,
    plain: bool,
    find: bool,
    charge: Charge<'_>,
) -> R<Option<Found>> {
    let from = start_offset(init, src.len());
    if from > src.len() {
        return Ok(None);
    }
    if find && (plain || !pat.iter().any(|b| SPECIALS.contains(b))) {
        return Ok(plain_find(src, pat, from, charge)?.map(|start| Found {
            start,
            end: start + pat.len(),
            caps: Vec::new(),
        }));
    }
    let anchor = pat.first() == Some(&b'^');
    let pat = if anchor { &pat[1..] } else { pat };
    let mut m = Matcher::new(src, pat, charge);
    let mut s1 = from;
    loop {
        m.reset();
        if let Some(e) = m.do_match(s1, 0)? {
            m.settle()?;
            return Ok(Some(Found {
                start: s1,
                end: e,
                caps: m.captures(s1, e, !find)?,
            }));
        }
        if anchor || s1 >= src.len() {
            break;
        }
        s1 += 1;
    }
    m.settle()?;
    Ok(None)
}

/// Lua values for captures of `src`.
fn push_caps(lua: &Lua, src: &[u8], caps: &[Cap], out: &mut Vec<Value>) -> mlua::Result<()> {
    for c in caps {
        out.push(match *c {
            Cap::Str(s, e) => Value::String(lua.create_string(&src[s..e])?),
            Cap::Pos(p) => Value::Integer(p as i64),
        });
    }
    Ok(())
}

/// The argument as a string (numbers converted, as `luaL_checklstring` does).
fn string_arg(lua: &Lua, v: Value, n: usize, fname: &str) -> mlua::Result<Vec<u8>> {
    let type_name = v.type_name();
    match lua.coerce_string(v)? {
        Some(s) => Ok(s.as_bytes().to_vec()),
        None => Err(lua_error(
            lua,
            format!("bad argument #{n} to '{fname}' (string expected, got {type_name})"),
        )),
    }
}

/// A string argument as the Lua string itself (a number converted), not a copy: for what
/// outlives the call (a `gmatch` iterator), whose bytes then stay in the Lua heap, under
/// the memory limit.
fn string_value(lua: &Lua, v: Value, n: usize, fname: &str) -> mlua::Result<mlua::LuaString> {
    let type_name = v.type_name();
    lua.coerce_string(v)?.ok_or_else(|| {
        lua_error(
            lua,
            format!("bad argument #{n} to '{fname}' (string expected, got {type_name})"),
        )
    })
}

/// An optional integer argument (`luaL_optinteger`).
fn int_arg(lua: &Lua, v: Option<Value>, n: usize, fname: &str, default: i64) -> mlua::Result<i64> {
    match v {
        None | Some(Value::Nil) => Ok(default),
        Some(v) => {
            let type_name = v.type_name();
            lua.coerce_integer(v)?.ok_or_else(|| {
                lua_error(
                    lua,
                    format!("bad argument #{n} to '{fname}' (number expected, got {type_name})"),
                )
            })
        }
    }
}

fn truthy(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

/// `file:line: ` of the Lua code that called the library function.
fn caller(lua: &Lua) -> String {
    lua.inspect_stack(1, |d| {
        let src = d.source();
        match (src.short_src, d.current_line()) {
            (Some(src), Some(line)) => format!("{src}:{line}: "),
            _ => String::new(),
        }
    })
    .unwrap_or_default()
}

/// A matcher error as a Lua error with the caller's position, as `luaL_error` gives it.
fn lua_error(lua: &Lua, msg: String) -> mlua::Error {
    mlua::Error::runtime(format!("{}{msg}", caller(lua)))
}

/// The charge function of one library call: its steps go to the state's meter.
fn charger<'l>(lua: &'l Lua, meter: &'l Meter) -> impl FnMut(u64) -> R<()> + 'l {
    move |n| meter.charge(lua, n)
}

/// Replaces the pattern functions of the state's `string` table with the counted ones.
pub(super) fn install(lua: &Lua, meter: &Arc<Meter>, max_result: usize) -> mlua::Result<()> {
    let string: Table = lua.globals().raw_get("string")?;

    let m = Arc::clone(meter);
    string.raw_set(
        "find",
        lua.create_function(
            move |lua, (s, p, init, plain): (Value, Value, Option<Value>, Option<Value>)| {
                let src = string_arg(lua, s, 1, "find")?;
                let pat = string_arg(lua, p, 2, "find")?;
                let init = int_arg(lua, init, 3, "find", 1)?;
                let mut charge = charger(lua, &m);
                let found = find_aux(&src, &pat, init, truthy(&plain), true, &mut charge)
                    .map_err(|e| lua_error(lua, e))?;
                let mut out = Vec::new();
                match found {
                    Some(f) => {
                        out.push(Value::Integer(f.start as i64 + 1));
                        out.push(Value::Integer(f.end as i64));
                        push_caps(lua, &src, &f.caps, &mut out)?;
                    }
                    None => out.push(Value::Nil),
                }
                Ok(MultiValue::from_vec(out))
            },
        )?,
    )?;

    let m = Arc::clone(meter);
    string.raw_set(
        "match",
        lua.create_function(move |lua, (s, p, init): (Value, Value, Option<Value>)| {
            let src = string_arg(lua, s, 1, "match")?;
            let pat = string_arg(lua, p, 2, "match")?;
            let init = int_arg(lua, init, 3, "match", 1)?;
            let mut charge = charger(lua, &m);
            let found = find_aux(&src, &pat, init, false, false, &mut charge)
                .map_err(|e| lua_error(lua, e))?;
            let mut out = Vec::new();
            match found {
                Some(f) => push_caps(lua, &src, &f.caps, &mut out)?,
                None => out.push(Value::Nil),
            }
            Ok(MultiValue::from_vec(out))
        })?,
    )?;

    let m = Arc::clone(meter);
    string.raw_set(
        "gmatch",
        lua.create_function(move |lua, (s, p, init): (Value, Value, Option<Value>)| {
            // The iterator keeps the subject and the pattern as Lua strings: copies (as
            // before) lived outside the Lua heap until the iterator was collected, so a
            // loop keeping iterators of a large subject grew memory past the limit.
            let subject = string_value(lua, s, 1, "gmatch")?;
            let pattern = string_value(lua, p, 2, "gmatch")?;
            let init = int_arg(lua, init, 3, "gmatch", 1)?;
            let len = subject.as_bytes().len();
            let mut pos = start_offset(init, len).min(len + 1);
            let mut last: Option<usize> = None;
            let m = Arc::clone(&m);
            lua.create_function_mut(move |lua, ()| {
                let (src, pat) = (subject.as_bytes(), pattern.as_bytes());
                let (src, pat) = (&*src, &*pat);
                let mut charge = charger(lua, &m);
                let mut matcher = Matcher::new(src, pat, &mut charge);
                let mut out = Vec::new();
                let mut at = pos;
                while at <= src.len() {
                    matcher.reset();
                    let e = matcher.do_match(at, 0).map_err(|e| lua_error(lua, e))?;
                    if let Some(e) = e
                        && Some(e) != last
                    {
                        pos = e;
                        last = Some(e);
                        let caps = matcher
                            .captures(at, e, true)
                            .map_err(|e| lua_error(lua, e))?;
                        matcher.settle().map_err(|e| lua_error(lua, e))?;
                        push_caps(lua, src, &caps, &mut out)?;
                        return Ok(MultiValue::from_vec(out));
                    }
                    at += 1;
                }
                pos = at;
                matcher.settle().map_err(|e| lua_error(lua, e))?;
                Ok(MultiValue::new())
            })
        })?,
    )?;

    let m = Arc::clone(meter);
    string.raw_set(
        "gsub",
        lua.create_function(
            move |lua, (s, p, repl, max_n): (Value, Value, Value, Option<Value>)| {
                gsub(lua, &m, max_result, s, p, repl, max_n)
            },
        )?,
    )?;
    Ok(())
}

/// The replacement of `string.gsub`.
enum Repl {
    Template(Vec<u8>),
    Table(Table),
    Function(Function),
}

/// `str_gsub`.
fn gsub(
    lua: &Lua,
    meter: &Meter,
    max_result: usize,
    s: Value,
    p: Value,
    repl: Value,
    max_n: Option<Value>,
) -> mlua::Result<(Value, i64)> {
    let src = string_arg(lua, s.clone(), 1, "gsub")?;
    let pat = string_arg(lua, p, 2, "gsub")?;
    let repl = match repl {
        Value::Table(t) => Repl::Table(t),
        Value::Function(f) => Repl::Function(f),
        v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
            Repl::Template(string_arg(lua, v, 3, "gsub")?)
        }
        other => {
            return Err(lua_error(
                lua,
                format!(
                    "bad argument #3 to 'gsub' (string/function/table expected, got {})",
                    other.type_name()
                ),
            ));
        }
    };
    let max_n = int_arg(lua, max_n, 4, "gsub", src.len() as i64 + 1)?;
    let anchor = pat.first() == Some(&b'^');
    let pat = if anchor { &pat[1..] } else { &pat[..] };
    let err = |e: String| lua_error(lua, e);
    let mut charge = charger(lua, meter);
    let mut m = Matcher::new(&src, pat, &mut charge);
    let mut out: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let mut last: Option<usize> = None;
    let mut n = 0i64;
    let mut changed = false;
    while n < max_n {
        m.reset();
        let e = m.do_match(at, 0).map_err(err)?;
        match e {
            Some(e) if Some(e) != last => {
                n += 1;
                changed |=
                    add_value(lua, &m, &repl, at, e, &mut out, max_result).map_err(
                        |e| match e {
                            AddError::Lua(e) => e,
                            AddError::Pattern(e) => err(e),
                        },
                    )?;
                at = e;
                last = Some(e);
            }
            _ if at < src.len() => {
                out.push(src[at]);
                at += 1;
            }
            _ => break,
        }
        if out.len() > max_result {
            return Err(err("not enough memory".into()));
        }
        if anchor {
            break;
        }
    }
    m.settle().map_err(err)?;
    let result = if changed {
        out.extend_from_slice(&src[at..]);
        if out.len() > max_result {
            return Err(err("not enough memory".into()));
        }
        Value::String(lua.create_string(&out)?)
    } else {
        // Unchanged: the subject as a string (Lua converts a number argument in place).
        match s {
            Value::String(s) => Value::String(s),
            _ => Value::String(lua.create_string(&src)?),
        }
    };
    Ok((result, n))
}

enum AddError {
    Lua(mlua::Error),
    Pattern(String),
}

impl From<mlua::Error> for AddError {
    fn from(e: mlua::Error) -> Self {
        AddError::Lua(e)
    }
}

/// `add_value`: appends the replacement of the match `s..e`; false when the original text
/// was kept. A template's expansion is checked against `max_result` at every piece, before
/// it is copied: a template of many `%0` expanded one match into gigabytes of Rust memory
/// (outside the Lua heap and its limit) before the check after the call.
fn add_value(
    lua: &Lua,
    m: &Matcher<'_>,
    repl: &Repl,
    s: usize,
    e: usize,
    out: &mut Vec<u8>,
    max_result: usize,
) -> Result<bool, AddError> {
    let src = m.src;
    let value = match repl {
        Repl::Template(t) => {
            let mut i = 0;
            while i < t.len() {
                if out.len() > max_result {
                    return Err(AddError::Pattern("not enough memory".into()));
                }
                let room = max_result + 1 - out.len();
                let c = t[i];
                i += 1;
                if c != b'%' {
                    out.push(c);
                    continue;
                }
                let d = t.get(i).copied().unwrap_or(0);
                i += 1;
                match d {
                    b'%' => out.push(b'%'),
                    b'0' => out.extend_from_slice(&src[s..e.min(s + room)]),
                    b'1'..=b'9' => match m
                        .get_capture(usize::from(d - b'1'), s, e)
                        .map_err(AddError::Pattern)?
                    {
                        Cap::Str(a, b) => out.extend_from_slice(&src[a..b.min(a + room)]),
                        Cap::Pos(p) => out.extend_from_slice(p.to_string().as_bytes()),
                    },
                    _ => {
                        return Err(AddError::Pattern(
                            "invalid use of '%' in replacement string".into(),
                        ));
                    }
                }
            }
            return Ok(true);
        }
        Repl::Function(f) => {
            let caps = m.captures(s, e, true).map_err(AddError::Pattern)?;
            let mut args = Vec::new();
            push_caps(lua, src, &caps, &mut args)?;
            f.call::<Value>(MultiValue::from_vec(args))?
        }
        Repl::Table(t) => {
            let key = match m.get_capture(0, s, e).map_err(AddError::Pattern)? {
                Cap::Str(a, b) => Value::String(lua.create_string(&src[a..b])?),
                Cap::Pos(p) => Value::Integer(p as i64),
            };
            t.get::<Value>(key)?
        }
    };
    match value {
        Value::Nil | Value::Boolean(false) => {
            out.extend_from_slice(&src[s..e]);
            Ok(false)
        }
        v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
            if let Some(s) = lua.coerce_string(v)? {
                out.extend_from_slice(&s.as_bytes());
            }
            Ok(true)
        }
        other => Err(AddError::Pattern(format!(
            "invalid replacement value (a {})",
            other.type_name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(_: u64) -> R<()> {
        Ok(())
    }

    /// (subject, pattern, init, expected find result as (start, end, captures)).
    #[test]
    fn finds_as_lua_does() {
        type Row = (&'static str, &'static str, i64, Option<(usize, usize)>);
        let table: &[Row] = &[
            ("hello world", "o w", 1, Some((5, 7))),
            ("hello world", "l+", 1, Some((3, 4))),
            ("hello world", "^h", 1, Some((1, 1))),
            ("hello world", "^w", 1, None),
            ("hello world", "d$", 1, Some((11, 11))),
            ("hello", "", 10, None),
            ("hello", "", 6, Some((6, 5))),
            ("hello", "l", -2, Some((4, 4))),
            ("a.b", ".", 1, Some((1, 1))),
            ("a+b", "+", 1, Some((2, 2))),
            ("f(a(b)c)d", "%b()", 1, Some((2, 8))),
            ("THE (quick) fox", "%f[%a]%a+", 5, Some((6, 10))),
            ("key = value", "(%w+)%s*=%s*(%w+)", 1, Some((1, 11))),
            ("abcabc", "(abc)%1", 1, Some((1, 6))),
            ("x-y", "[%-]", 1, Some((2, 2))),
            ("a]b", "[]]", 1, Some((2, 2))),
            ("aaab", "a-b", 1, Some((1, 4))),
            ("\x0b", "%s", 1, Some((1, 1))),
            ("/3303/12/5700", "^/3303/%d+/5700$", 1, Some((1, 13))),
        ];
        for &(s, p, init, want) in table {
            let got = find_aux(s.as_bytes(), p.as_bytes(), init, false, true, &mut free)
                .unwrap_or_else(|e| panic!("{s:?} {p:?}: {e}"))
                .map(|f| (f.start + 1, f.end));
            assert_eq!(got, want, "{s:?} {p:?} {init}");
        }
    }

    #[test]
    fn captures_and_errors_as_lua() {
        let f = find_aux(b"key = 42", b"(%w+) = ()(%d+)", 1, false, false, &mut free)
            .unwrap()
            .unwrap();
        assert_eq!(f.caps, vec![Cap::Str(0, 3), Cap::Pos(7), Cap::Str(6, 8)]);
        for (p, msg) in [
            ("%", "malformed pattern (ends with '%')"),
            ("[a", "malformed pattern (missing ']')"),
            ("(a", "unfinished capture"),
            ("a)", "invalid pattern capture"),
            ("%1", "invalid capture index %1"),
            ("%b", "malformed pattern (missing arguments to '%b')"),
            ("%fa", "missing '[' after '%f' in pattern"),
        ] {
            let e = find_aux(b"aaa", p.as_bytes(), 1, false, false, &mut free)
                .err()
                .unwrap_or_default();
            assert_eq!(e, msg, "{p}");
        }
    }

    /// Each expression evaluated with Lua's own (C) string library and with ours: the same
    /// results, or both an error with the same message.
    #[test]
    fn agrees_with_lua_s_own_matcher() {
        let reference = Lua::new();
        let ours = Lua::new();
        let cfg = crate::config::LuaConfig {
            instruction_budget: u64::MAX,
            time_limit_ms: 60_000,
            ..crate::config::LuaConfig::default()
        };
        let meter = Arc::new(Meter::new(&cfg));
        meter.start();
        install(&ours, &meter, 1 << 20).expect("install");
        let cases = [
            r#"string.find("hello world", "o w")"#,
            r#"string.find("hello world", "o", 6)"#,
            r#"string.find("hello world", "l", -3)"#,
            r#"string.find("hello", "", 10)"#,
            r#"string.find("hello", "", 6)"#,
            r#"string.find("a+b", "+", 1, true)"#,
            r#"string.find("a.b", ".", 2, true)"#,
            r#"string.find("abc", "b", -100)"#,
            r#"string.find(12345, 34)"#,
            r#"string.find("key = 42", "(%w+) = ()(%d+)")"#,
            r#"("THE (quick) fox"):find("%f[%a]%a+", 5)"#,
            r#"string.match("  trim me  ", "^%s*(.-)%s*$")"#,
            r#"string.match("2026-12-04", "(%d+)-(%d+)-(%d+)")"#,
            r#"string.match("f(a(b)c)d", "%b()")"#,
            r#"string.match("abcabc", "(abc)%1")"#,
            r#"string.match("x = [[y]]", "%[(%[?)")"#,
            r#"string.match("[]^-", "[]^-]+")"#,
            r#"string.match("a-z", "[a%-z]+")"#,
            r#"string.match("\0a\0", "%z")"#,
            r#"string.match("\0a\0", "[%z]")"#,
            r#"string.match("\11\12", "%s+")"#,
            r#"string.match("h\195\169llo", "[\128-\255]+")"#,
            r#"string.match("hello", "()ll()")"#,
            r#"string.match("hello", "^(h)(e)")"#,
            r#"string.match("hello", "o$")"#,
            r#"string.match("hel$lo", "l$l")"#,
            r#"string.match("/3303/0/5700", "^/(%d+)/%d+/(%d+)$")"#,
            r#"string.match("aaa", "a-b")"#,
            r#"string.match("aaab", "a-b")"#,
            r#"string.match("aaa", "^a?a?a?a$")"#,
            r#"string.match("%", "%%")"#,
            r#"string.match("x", "%")"#,
            r#"string.match("x", "[x")"#,
            r#"string.match("x", "(x")"#,
            r#"string.match("x", "x)")"#,
            r#"string.match("x", "%1")"#,
            r#"string.match("x", "%b")"#,
            r#"string.match("x", "%fx")"#,
            r#"string.match("x", string.rep("(", 40) .. "x" .. string.rep(")", 40))"#,
            r#"string.match(string.rep("a", 300), string.rep("a?", 250))"#,
            r#"string.match(nil, "x")"#,
            r#"string.match("x", {})"#,
            r#"string.find("x", "x", "a")"#,
            r#"string.gsub("hello world", "o", "0")"#,
            r#"string.gsub("hello world", "o", "0", 1)"#,
            r#"string.gsub("hello world", "(%w+)", "<%1>")"#,
            r#"string.gsub("hello world", "%w+", "%0 %0")"#,
            r#"string.gsub("abc", "", "-")"#,
            r#"string.gsub("abc", ".-", "-")"#,
            r#"string.gsub("abc", "^", ">")"#,
            r#"string.gsub("abc", "^b", ">")"#,
            r#"string.gsub("abc", "b*", "X")"#,
            r#"string.gsub("$name is $age", "%$(%w+)", {name = "Ann", age = 7})"#,
            r#"string.gsub("$name is $x", "%$(%w+)", {name = "Ann"})"#,
            r#"string.gsub("a b c", "%a", function(c) if c ~= "b" then return c:upper() end end)"#,
            r#"string.gsub("a b", "()%a", "%1")"#,
            r#"string.gsub("abc", "b", "%2")"#,
            r#"string.gsub("abc", "b", "%x")"#,
            r#"string.gsub("abc", "b", "%")"#,
            r#"string.gsub("abc", "b", {b = {}})"#,
            r#"string.gsub("abc", "b", true)"#,
            r#"string.gsub("abc", "b", 5)"#,
            r#"string.gsub("abc", "b", "x", -1)"#,
            r#"string.gsub(123, "x", "y")"#,
            r#"string.gsub(123, "2", "y")"#,
            r#"(function() local t = {} for k, v in string.gmatch("a=1, b=2", "(%w+)=(%w+)") do t[#t+1] = k .. v end return table.concat(t, ";") end)()"#,
            r#"(function() local t = {} for w in ("one two  three"):gmatch("%a*") do t[#t+1] = "[" .. w .. "]" end return table.concat(t) end)()"#,
            r#"(function() local t = {} for p in ("abc"):gmatch("()") do t[#t+1] = p end return table.concat(t, ",") end)()"#,
            r#"(function() local t = {} for w in ("abcabc"):gmatch("b", 3) do t[#t+1] = w end return #t end)()"#,
            r#"(function() local t = {} for w in ("^a^b"):gmatch("^%a") do t[#t+1] = w end return table.concat(t) end)()"#,
        ];
        let describe = r#"
            local t = ...
            local out = {tostring(t[1])}
            if t[1] then
                for i = 2, t.n do out[#out + 1] = math.type(t[i]) or type(t[i]); out[#out + 1] = tostring(t[i]) end
            else
                -- the message without position and traceback
                local msg = tostring(t[2]):match("^[^\n]*")
                out[#out + 1] = (msg:gsub("^.-:%d+: ", ""))
            end
            return table.concat(out, "|")
        "#;
        let mut differ = Vec::new();
        for expr in cases {
            let code = format!("return table.pack(pcall(function() return {expr} end))");
            let run = |lua: &Lua| -> String {
                let packed: Table = lua.load(&code).eval().expect("evaluates");
                let f: Function = lua.load(describe).into_function().expect("describe");
                f.call(packed).expect("described")
            };
            let (a, b) = (run(&ours), run(&reference));
            if a != b {
                differ.push(format!("{expr}\n  ours: {a:?}\n   Lua: {b:?}"));
            }
        }
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }

    #[test]
    fn backtracking_is_charged_and_stoppable() {
        let src = vec![b'a'; 300];
        let pat = [b"a*".repeat(30), b"b".to_vec()].concat();
        let mut total = 0u64;
        let mut budget = |n: u64| {
            total += n;
            if total > 1_000_000 {
                Err("instruction budget exceeded".to_string())
            } else {
                Ok(())
            }
        };
        let e = find_aux(&src, &pat, 1, false, true, &mut budget).err();
        assert_eq!(e.as_deref(), Some("instruction budget exceeded"));
    }
}
