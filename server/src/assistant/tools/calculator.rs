//! `calculator`: a safe arithmetic evaluator (no variables, no code, bounded work).
//!
//! A small recursive-descent parser over `+ - * / % ^`, parentheses, unary signs, decimal and
//! scientific literals, the constants `pi` and `e` and a few functions (`sqrt`, `abs`, `ln`,
//! `log10`, `exp`, `sin`, `cos`, `tan`, `floor`, `ceil`, `round`, `min`, `max`). Integers stay
//! exact (i128) while every step is exact — `1234 * 5678` is `7006652`, not `7006652.0` — and
//! fall back to f64 on division with a remainder, a fractional operand or overflow. No crate
//! fitted: `evalexpr` is AGPL, `meval` unmaintained since 2017.
//!
//! Invariants: input at most [`MAX_LEN`] bytes and [`MAX_DEPTH`] nested levels (no stack
//! exhaustion), integer powers bounded, a non-finite result is an error, never `inf`/`NaN`.
//!
//! Tested below: precedence and associativity, exact integers, division by zero, malformed
//! input naming the position, depth and length limits.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_args, Tool, ToolContext, ToolError};

/// Longest expression accepted, in bytes.
const MAX_LEN: usize = 512;
/// Deepest nesting of parentheses, function calls and unary signs.
const MAX_DEPTH: usize = 64;

pub(crate) struct Calculator;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    expression: String,
}

#[async_trait]
impl Tool for Calculator {
    fn name(&self) -> &'static str {
        "calculator"
    }

    fn description(&self) -> &'static str {
        "Evaluates an arithmetic expression exactly: numbers, + - * / % ^, parentheses, sqrt, abs, ln, exp, min, max."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                // The pattern keeps a constrained decoder on arithmetic (a small model otherwise
                // wanders into prose inside the string).
                "expression": {
                    "type": "string",
                    "description": "The arithmetic expression to evaluate, for example 2 * (3 + 4).",
                    "pattern": "^[-+(0-9A-Za-z][0-9A-Za-z_+*/%^()., -]{0,199}$"
                }
            },
            "required": ["expression"],
            "additionalProperties": false
        })
    }

    async fn run(&self, args: Value, _ctx: &ToolContext) -> Result<String, ToolError> {
        let a: Args = parse_args(args)?;
        evaluate(&a.expression)
            .map(|n| n.to_string())
            .map_err(ToolError::Failed)
    }
}

/// A value: exact while it can be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(x) => x,
        }
    }
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::Int(i) => write!(f, "{i}"),
            // A float with an integral value prints without a fraction when it is exact.
            Num::Float(x) if x.fract() == 0.0 && x.abs() < 1e15 => write!(f, "{}", *x as i64),
            // Very large or small magnitudes in scientific notation, not 60 digits of zeros.
            Num::Float(x) if x.abs() >= 1e15 || (*x != 0.0 && x.abs() < 1e-6) => write!(f, "{x:e}"),
            Num::Float(x) => write!(f, "{x}"),
        }
    }
}

/// Evaluates `expr`; the error says what is wrong and where.
pub(crate) fn evaluate(expr: &str) -> Result<Num, String> {
    if expr.len() > MAX_LEN {
        return Err(format!("the expression is longer than {MAX_LEN} bytes"));
    }
    let mut p = Parser {
        s: expr.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let v = p.sum()?;
    p.skip_ws();
    if p.pos < p.s.len() {
        return Err(format!("unexpected {:?} at position {}", p.rest_char(), p.pos));
    }
    match v {
        Num::Float(x) if !x.is_finite() => Err("the result is not a finite number".into()),
        v => Ok(v),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn rest_char(&self) -> char {
        std::str::from_utf8(&self.s[self.pos..])
            .ok()
            .and_then(|r| r.chars().next())
            .unwrap_or('?')
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("the expression nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    /// sum := product (('+' | '-') product)*
    fn sum(&mut self) -> Result<Num, String> {
        let mut acc = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let rhs = self.product()?;
            acc = arith(op, acc, rhs)?;
        }
        Ok(acc)
    }

    /// product := unary (('*' | '/' | '%') unary)*
    fn product(&mut self) -> Result<Num, String> {
        let mut acc = self.unary()?;
        while let Some(op @ (b'*' | b'/' | b'%')) = self.peek() {
            // `**` is a power, handled below `unary`.
            if op == b'*' && self.s.get(self.pos + 1) == Some(&b'*') {
                break;
            }
            self.pos += 1;
            let rhs = self.unary()?;
            acc = arith(op, acc, rhs)?;
        }
        Ok(acc)
    }

    /// unary := ('-' | '+') unary | power
    fn unary(&mut self) -> Result<Num, String> {
        match self.peek() {
            Some(op @ (b'-' | b'+')) => {
                self.pos += 1;
                self.enter()?;
                let v = self.unary()?;
                self.depth -= 1;
                Ok(if op == b'-' { neg(v) } else { v })
            }
            _ => self.power(),
        }
    }

    /// power := atom (('^' | '**') unary)?   (right-associative; -2^2 = -4)
    fn power(&mut self) -> Result<Num, String> {
        let base = self.atom()?;
        let is_pow = match self.peek() {
            Some(b'^') => {
                self.pos += 1;
                true
            }
            Some(b'*') if self.s.get(self.pos + 1) == Some(&b'*') => {
                self.pos += 2;
                true
            }
            _ => false,
        };
        if !is_pow {
            return Ok(base);
        }
        self.enter()?;
        let exp = self.unary()?;
        self.depth -= 1;
        pow(base, exp)
    }

    fn atom(&mut self) -> Result<Num, String> {
        match self.peek() {
            None => Err("the expression ends where a number was expected".into()),
            Some(b'(') => {
                self.pos += 1;
                self.enter()?;
                let v = self.sum()?;
                self.depth -= 1;
                self.expect(b')')?;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => self.number(),
            Some(c) if c.is_ascii_alphabetic() => self.name(),
            Some(_) => Err(format!("unexpected {:?} at position {}", self.rest_char(), self.pos)),
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else if self.pos >= self.s.len() {
            Err(format!("missing {:?} at the end", c as char))
        } else {
            Err(format!(
                "expected {:?} at position {}, found {:?}",
                c as char,
                self.pos,
                self.rest_char()
            ))
        }
    }

    fn number(&mut self) -> Result<Num, String> {
        let start = self.pos;
        let digits = |p: &mut Self| {
            while p.pos < p.s.len() && (p.s[p.pos].is_ascii_digit() || p.s[p.pos] == b'_') {
                p.pos += 1;
            }
        };
        digits(self);
        let mut float = false;
        if self.s.get(self.pos) == Some(&b'.') {
            float = true;
            self.pos += 1;
            digits(self);
        }
        if matches!(self.s.get(self.pos), Some(b'e' | b'E'))
            && self
                .s
                .get(self.pos + 1)
                .is_some_and(|c| c.is_ascii_digit() || *c == b'-' || *c == b'+')
        {
            float = true;
            self.pos += 2;
            digits(self);
        }
        let text: String = std::str::from_utf8(&self.s[start..self.pos])
            .unwrap_or_default()
            .chars()
            .filter(|c| *c != '_')
            .collect();
        let bad = || format!("malformed number {text:?} at position {start}");
        if float {
            text.parse::<f64>().map(Num::Float).map_err(|_| bad())
        } else {
            match text.parse::<i128>() {
                Ok(i) => Ok(Num::Int(i)),
                Err(_) => text.parse::<f64>().map(Num::Float).map_err(|_| bad()),
            }
        }
    }

    fn name(&mut self) -> Result<Num, String> {
        let start = self.pos;
        while self.pos < self.s.len() && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_') {
            self.pos += 1;
        }
        let name = std::str::from_utf8(&self.s[start..self.pos])
            .unwrap_or_default()
            .to_ascii_lowercase();
        match name.as_str() {
            "pi" => return Ok(Num::Float(std::f64::consts::PI)),
            "e" => return Ok(Num::Float(std::f64::consts::E)),
            _ => {}
        }
        if self.peek() != Some(b'(') {
            return Err(format!("unknown name {name:?} at position {start}"));
        }
        self.pos += 1;
        self.enter()?;
        let mut args = vec![self.sum()?];
        while self.peek() == Some(b',') {
            self.pos += 1;
            args.push(self.sum()?);
        }
        self.depth -= 1;
        self.expect(b')')?;
        call(&name, &args).map_err(|e| format!("{name}(): {e}"))
    }
}

fn neg(v: Num) -> Num {
    match v {
        Num::Int(i) => i.checked_neg().map_or(Num::Float(-(i as f64)), Num::Int),
        Num::Float(x) => Num::Float(-x),
    }
}

fn arith(op: u8, a: Num, b: Num) -> Result<Num, String> {
    if let (Num::Int(x), Num::Int(y)) = (a, b) {
        let exact = match op {
            b'+' => x.checked_add(y),
            b'-' => x.checked_sub(y),
            b'*' => x.checked_mul(y),
            b'/' | b'%' if y == 0 => return Err("division by zero".into()),
            b'/' if x % y == 0 => x.checked_div(y),
            b'%' => x.checked_rem(y),
            _ => None,
        };
        if let Some(v) = exact {
            return Ok(Num::Int(v));
        }
    }
    let (x, y) = (a.f(), b.f());
    Ok(Num::Float(match op {
        b'+' => x + y,
        b'-' => x - y,
        b'*' => x * y,
        b'/' | b'%' if y == 0.0 => return Err("division by zero".into()),
        b'/' => x / y,
        _ => x % y,
    }))
}

fn pow(base: Num, exp: Num) -> Result<Num, String> {
    if let (Num::Int(b), Num::Int(e)) = (base, exp) {
        if let Ok(e) = u32::try_from(e) {
            if let Some(v) = b.checked_pow(e) {
                return Ok(Num::Int(v));
            }
        }
    }
    Ok(Num::Float(base.f().powf(exp.f())))
}

fn call(name: &str, args: &[Num]) -> Result<Num, String> {
    let one = || match args {
        [x] => Ok(x.f()),
        _ => Err(format!("takes 1 argument, got {}", args.len())),
    };
    let v = match name {
        "sqrt" => {
            let x = one()?;
            if x < 0.0 {
                return Err("negative argument".into());
            }
            x.sqrt()
        }
        "abs" => {
            return match args {
                [Num::Int(i)] => i.checked_abs().map(Num::Int).ok_or_else(|| "overflow".to_string()),
                _ => Ok(Num::Float(one()?.abs())),
            }
        }
        "ln" | "log10" => {
            let x = one()?;
            if x <= 0.0 {
                return Err("argument must be > 0".into());
            }
            if name == "ln" {
                x.ln()
            } else {
                x.log10()
            }
        }
        "exp" => one()?.exp(),
        "sin" => one()?.sin(),
        "cos" => one()?.cos(),
        "tan" => one()?.tan(),
        "floor" => one()?.floor(),
        "ceil" => one()?.ceil(),
        "round" => one()?.round(),
        "min" | "max" if !args.is_empty() => {
            let pick = |a: Num, b: Num| {
                let take_b = if name == "min" { b.f() < a.f() } else { b.f() > a.f() };
                if take_b {
                    b
                } else {
                    a
                }
            };
            return Ok(args[1..].iter().fold(args[0], |a, b| pick(a, *b)));
        }
        _ => return Err("unknown function".into()),
    };
    Ok(Num::Float(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(e: &str) -> String {
        evaluate(e).unwrap_or_else(|err| panic!("{e}: {err}")).to_string()
    }

    fn err(e: &str) -> String {
        evaluate(e).expect_err(e)
    }

    #[test]
    fn precedence_associativity_and_exact_integers() {
        assert_eq!(ok("1234 * 5678"), "7006652");
        assert_eq!(ok("2 + 3 * 4"), "14");
        assert_eq!(ok("(2 + 3) * 4"), "20");
        assert_eq!(ok("10 - 4 - 3"), "3");
        assert_eq!(ok("2 ^ 3 ^ 2"), "512", "power is right-associative");
        assert_eq!(ok("2 ** 10"), "1024");
        assert_eq!(ok("-2 ^ 2"), "-4", "a sign binds looser than the power");
        assert_eq!(ok("--3"), "3");
        assert_eq!(ok("7 % 3"), "1");
        assert_eq!(ok("12 / 4"), "3");
        assert_eq!(ok("7 / 2"), "3.5");
        assert_eq!(ok("1_000_000 * 3"), "3000000");
        // Beyond f64's 53 bits, exactly.
        assert_eq!(ok("123456789123 * 987654321987"), "121932631355968601347401");
        assert_eq!(ok("0.1 + 0.2"), "0.30000000000000004");
        assert_eq!(ok("1.5e3 + 1"), "1501");
        assert_eq!(ok("sqrt(16) + abs(-3)"), "7");
        assert_eq!(ok("max(1, 7, 3) - min(4, 2)"), "5");
        assert_eq!(ok("round(pi * 100)"), "314");
        assert_eq!(ok("  ( 1 )  "), "1");
    }

    #[test]
    fn overflow_falls_back_to_floats() {
        let big = ok("2 ^ 200");
        assert!(big.starts_with("1.60693804425899") && big.ends_with("e60"), "{big}");
        assert_eq!(ok("1 / 3000000000"), "3.333333333333333e-10");
        assert_eq!(
            evaluate("170141183460469231731687303715884105727 + 1").map(|n| n.f()),
            Ok(2f64.powi(127))
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(err("1 / 0"), "division by zero");
        assert_eq!(err("5 % 0"), "division by zero");
        assert_eq!(err("1.0 / 0"), "division by zero");
        assert!(err("2 +").contains("ends where a number was expected"));
        assert!(err("2 $ 3").contains("position 2"), "{}", err("2 $ 3"));
        assert!(err("(1 + 2").contains("missing ')'"));
        assert!(err("foo(2)").contains("unknown function"));
        assert!(err("x + 1").contains("unknown name \"x\""));
        assert!(err("sqrt(-1)").contains("negative"));
        assert!(err("ln(0)").contains("> 0"));
        assert!(err("sqrt(1, 2)").contains("1 argument"));
        assert_eq!(err("10 ^ 400"), "the result is not a finite number");
        assert!(err("").contains("ends where"));
        assert!(err("1..2").contains("position 2"));
        assert!(err(".").contains("malformed number"));
    }

    #[test]
    fn limits_bound_the_work() {
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(err(&deep).contains("deeper than"));
        assert!(err(&"-".repeat(100)).contains("deeper than"));
        let long = "1+".repeat(300) + "1";
        assert!(err(&long).contains("longer than"));
        assert_eq!(ok(&format!("{}1{}", "(".repeat(60), ")".repeat(60))), "1");
    }
}
