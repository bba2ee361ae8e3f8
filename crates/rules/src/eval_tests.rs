//! Operator and function truth tables (spec §3, reference
//! `sql_operators.test.ts` / `sql_functions.test.ts`).

use crate::compile::{Mode, Scope};
use crate::expr::Ctx;
use crate::sql::parse_select;
use crate::value::SqliteValue;
use sqlparser::ast::SelectItem;

fn eval_with(expr: &str, fixed_json: bool) -> Result<SqliteValue, String> {
    let q = parse_select(&format!("SELECT {expr} AS r"))?;
    let Some(SelectItem::ExprWithAlias { expr, .. }) = q.projection.first() else {
        return Err("bad test expression".into());
    };
    let scope = Scope {
        mode: Mode::ParamStatic,
        tables: Vec::new(),
        wildcard: false,
        each_alias: None,
    };
    let (e, _) = scope.expr(expr)?;
    e.eval(&Ctx {
        fixed_json,
        ..Ctx::default()
    })
}

fn eval(expr: &str) -> SqliteValue {
    eval_with(expr, false).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

fn int(i: i64) -> SqliteValue {
    SqliteValue::Integer(i)
}

fn real(f: f64) -> SqliteValue {
    SqliteValue::Real(f)
}

fn text(s: &str) -> SqliteValue {
    SqliteValue::Text(s.into())
}

const NULL: SqliteValue = SqliteValue::Null;

#[test]
fn comparison_operators() {
    assert_eq!(eval("1.0 = 1"), int(1));
    assert_eq!(eval("'1' = 1"), int(0));
    assert_eq!(eval("1 = NULL"), NULL);
    assert_eq!(eval("NULL = NULL"), NULL);
    assert_eq!(eval("NULL IS NULL"), int(1));
    assert_eq!(eval("1 IS NULL"), int(0));
    assert_eq!(eval("NULL IS NOT NULL"), int(0));
    assert_eq!(eval("'text' > 1"), int(1));
    assert_eq!(eval("'a' < 'b'"), int(1));
    assert_eq!(eval("2 != 3"), int(1));
    assert_eq!(eval("2 <= 2.0"), int(1));
    assert_eq!(eval("3 >= 4"), int(0));
}

#[test]
fn arithmetic_operators() {
    assert_eq!(eval("5 / 2"), int(2));
    assert_eq!(eval("-5 / 2"), int(-2));
    assert_eq!(eval("5 / 2.0"), real(2.5));
    assert_eq!(eval("CAST(5 AS real) / 2"), real(2.5));
    assert_eq!(eval("1 / 0"), NULL);
    assert_eq!(eval("1.5 / 0"), NULL);
    assert_eq!(eval("2 + 3"), int(5));
    assert_eq!(eval("2 - 3.5"), real(-1.5));
    assert_eq!(eval("'12abc' * 2"), int(24));
    assert_eq!(eval("'abc' + 1"), int(1));
    assert_eq!(eval("NULL + 1"), NULL);
    assert_eq!(eval("9223372036854775807 + 1"), real(9223372036854775808.0));
}

#[test]
fn boolean_operators() {
    assert_eq!(eval("NULL AND 1"), int(0));
    assert_eq!(eval("NULL OR 1"), int(1));
    assert_eq!(eval("NULL OR NULL"), int(0));
    assert_eq!(eval("NOT NULL"), int(1));
    assert_eq!(eval("NOT 'abc'"), int(1));
    assert_eq!(eval("NOT '1abc'"), int(0));
    assert_eq!(eval("true AND 2"), int(1));
    assert_eq!(eval("1 IS TRUE"), int(1));
    assert_eq!(eval("0 IS FALSE"), int(1));
}

#[test]
fn concat_and_in() {
    assert_eq!(eval("'a' || 1 || 2.5"), text("a12.5"));
    assert_eq!(eval("'a' || 3.0"), text("a3"));
    assert_eq!(eval("'a' || NULL"), NULL);
    assert_eq!(eval("'b' IN '[\"a\",\"b\"]'"), int(1));
    assert_eq!(eval("'c' IN '[\"a\",\"b\"]'"), int(0));
    assert_eq!(eval("1 IN '[1.0,2]'"), int(1));
    assert_eq!(eval("1 IN '[true]'"), int(1));
    assert_eq!(eval("NULL IN '[1]'"), NULL);
    assert_eq!(eval("1 IN ('[1]')"), int(1));
    assert!(eval_with("1 IN 'nope'", false).is_err());
}

#[test]
fn json_operators_legacy() {
    let data = r#"'{"count":5,"bool":true,"n":null,"a":{"b":[1,2.0]}}'"#;
    assert_eq!(eval(&format!("{data} ->> 'count'")), int(5));
    assert_eq!(eval(&format!("{data} -> 'bool'")), text("true"));
    assert_eq!(eval(&format!("{data} ->> 'bool'")), int(1));
    assert_eq!(eval("'true' ->> '$'"), int(1));
    assert_eq!(eval(&format!("json_extract({data}, '$.bool')")), int(1));
    assert_eq!(eval(&format!("{data} ->> 'a.b'")), text("[1,2.0]"));
    assert_eq!(eval(&format!("{data} -> 'a'")), text(r#"{"b":[1,2.0]}"#));
    assert_eq!(eval(&format!("{data} ->> '$.a.b.1'")), real(2.0));
    assert_eq!(eval(&format!("{data} ->> 'n'")), text("null"));
    assert_eq!(eval(&format!("{data} -> 'n'")), NULL);
    assert_eq!(eval(&format!("{data} ->> 'missing'")), NULL);
    assert!(eval_with("'nope' ->> 'x'", false).is_err());
    assert!(eval_with("json_extract('{}', 'x')", false).is_err());
}

#[test]
fn json_operators_fixed() {
    let data = r#"'{"a.b":1,"a":{"b":2},"n":null}'"#;
    let fixed = |e: &str| eval_with(e, true).unwrap_or_else(|err| panic!("{e}: {err}"));
    assert_eq!(fixed(&format!("{data} ->> 'a.b'")), int(1));
    assert_eq!(eval(&format!("{data} ->> 'a.b'")), int(2));
    assert_eq!(fixed(&format!("{data} ->> '$.a.b'")), int(2));
    assert_eq!(fixed(&format!("{data} ->> 'n'")), NULL);
    assert_eq!(fixed(&format!("{data} -> 'n'")), text("null"));
}

#[test]
fn scalar_functions() {
    assert_eq!(
        eval(r#"json_keys('{"a":1,"b":"2","0":"test","c":{}}')"#),
        text(r#"["0","a","b","c"]"#)
    );
    assert!(eval_with("json_keys('1')", false).is_err());
    assert_eq!(eval(r#"json_valid('{"a":1,"a":2}')"#), int(0));
    assert_eq!(eval("json_valid('3')"), int(1));
    assert_eq!(eval("json_valid('TRUE')"), int(0));
    assert_eq!(eval("json_valid(NULL)"), int(0));
    assert_eq!(eval("hex(NULL)"), text(""));
    assert_eq!(eval("hex(123.4)"), text("3132332E34"));
    assert_eq!(eval("length(123.4)"), int(5));
    assert_eq!(eval("length(NULL)"), NULL);
    assert_eq!(eval("length('😀')"), int(2));
    assert_eq!(eval("base64(123)"), text("MTIz"));
    assert_eq!(eval("base64(NULL)"), text(""));
    assert_eq!(eval(r#"json_array_length('{"a":[1,2,3,4]}')"#), int(0));
    assert_eq!(eval(r#"json_array_length('{"a":[1,2,3,4]}', '$.a')"#), int(4));
    assert_eq!(eval("json_array_length(NULL)"), NULL);
    assert_eq!(eval("upper('abc')"), text("ABC"));
    assert_eq!(eval("lower('ÀB')"), text("àb"));
    assert_eq!(eval("upper(NULL)"), NULL);
    assert_eq!(eval("typeof(1)"), text("integer"));
    assert_eq!(eval("typeof(1.5)"), text("real"));
    assert_eq!(eval("typeof('x')"), text("text"));
    assert_eq!(eval("typeof(NULL)"), text("null"));
    assert_eq!(eval("typeof(CAST('x' AS blob))"), text("blob"));
    assert_eq!(eval("ifnull(NULL, 2)"), int(2));
    assert_eq!(eval("ifnull(1, 2)"), int(1));
    assert_eq!(eval("iif(1, 'a', 'b')"), text("a"));
    assert_eq!(eval("iif(NULL, 'a', 'b')"), text("b"));
    assert_eq!(eval("instr('hello', 'll')"), int(3));
    assert_eq!(eval("instr('hello', 'x')"), int(0));
    assert_eq!(eval("instr(NULL, 'x')"), NULL);
    assert_eq!(eval("substring('hello', 2, 3)"), text("ell"));
    assert_eq!(eval("substring('hello', -3)"), text("llo"));
    assert_eq!(eval("UPPER('x')"), text("X"));
}

#[test]
fn casts() {
    assert_eq!(eval("CAST(1.9 AS integer)"), int(1));
    assert_eq!(eval("CAST(-1.5 AS integer)"), int(-2));
    assert_eq!(eval("CAST('1e5' AS integer)"), int(1));
    assert_eq!(eval("CAST('1.5' AS numeric)"), real(1.5));
    assert_eq!(eval("CAST('12' AS numeric)"), int(12));
    assert_eq!(eval("CAST('x' AS numeric)"), int(0));
    assert_eq!(eval("CAST(3.0 AS text)"), text("3"));
    assert_eq!(eval("3.5::text"), text("3.5"));
    assert_eq!(eval("CAST(2 AS real)"), real(2.0));
    assert_eq!(eval("CAST(NULL AS text)"), NULL);
    assert_eq!(eval("CAST('ab' AS blob)"), SqliteValue::Blob(b"ab".to_vec()));
    assert_eq!(
        eval_with("CAST(1 AS varchar)", false).err().as_deref(),
        Some("CAST not supported for 'varchar'")
    );
}

#[test]
fn unsupported_expressions() {
    let err = |e: &str| eval_with(e, false).err().unwrap_or_default();
    assert_eq!(err("'a' LIKE 'b'"), "Operator not supported: LIKE");
    assert_eq!(err("1 % 2"), "Operator not supported: %");
    assert_eq!(err("foo(1)"), "Function 'foo' is not defined");
    assert_eq!(err("upper(1, 2)"), "Function 'upper' takes 1 arguments.");
    assert_eq!(err("request.foo()"), "Function 'request.foo' is not defined");
    assert_eq!(err("request.user_id(1)"), "Function 'request.user_id' takes 0 arguments.");
}
