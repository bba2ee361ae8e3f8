//! Tests of the WKB parser and its WKT / GeoJSON printers.

use super::*;

/// Little-endian WKB builder.
#[derive(Default, Clone)]
struct W(Vec<u8>);

impl W {
    fn le(code: u32) -> Self {
        let mut w = W(vec![1]);
        w.0.extend(code.to_le_bytes());
        w
    }
    fn be(code: u32) -> Self {
        let mut w = W(vec![0]);
        w.0.extend(code.to_be_bytes());
        w
    }
    fn u32(mut self, n: u32) -> Self {
        let le = self.0[0] != 0;
        self.0.extend(if le { n.to_le_bytes() } else { n.to_be_bytes() });
        self
    }
    fn f(mut self, fs: &[f64]) -> Self {
        let le = self.0[0] != 0;
        for f in fs {
            self.0.extend(if le { f.to_le_bytes() } else { f.to_be_bytes() });
        }
        self
    }
    fn g(mut self, child: W) -> Self {
        self.0.extend(child.0);
        self
    }
}

fn pt(x: f64, y: f64) -> W {
    W::le(1).f(&[x, y])
}

fn run(f: GeoFn, w: &W) -> Result<SqliteValue, String> {
    call(f, &SqliteValue::Blob(w.0.clone()))
}

fn text(f: GeoFn, w: &W) -> String {
    match run(f, w) {
        Ok(SqliteValue::Text(t)) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

/// `(WKT, GeoJSON)` of a geometry.
fn both(w: &W) -> (String, String) {
    (text(GeoFn::AsText, w), text(GeoFn::AsGeoJson, w))
}

fn err(w: &W) -> String {
    run(GeoFn::AsText, w).expect_err("expected an error")
}

#[test]
fn points_in_both_byte_orders() {
    let le = pt(1.0, 2.0);
    assert_eq!(
        both(&le),
        ("POINT(1 2)".into(), r#"{"type":"Point","coordinates":[1.0,2.0]}"#.into())
    );
    let be = W::be(1).f(&[2.0, 4.5]);
    assert_eq!(
        both(&be),
        ("POINT(2 4.5)".into(), r#"{"type":"Point","coordinates":[2.0,4.5]}"#.into())
    );
    assert_eq!(run(GeoFn::X, &be), Ok(SqliteValue::Real(2.0)));
    assert_eq!(run(GeoFn::Y, &be), Ok(SqliteValue::Real(4.5)));
    // Any non-zero byte-order byte is little endian.
    let mut odd = pt(1.0, 2.0);
    odd.0[0] = 7;
    assert_eq!(text(GeoFn::AsText, &odd), "POINT(1 2)");
}

#[test]
fn dimensions_iso_and_ewkb() {
    let cases = [
        (W::le(1001).f(&[1.0, 2.0, 3.0]), "POINT Z (1 2 3)", "[1.0,2.0,3.0]"),
        (W::le(2001).f(&[1.0, 2.0, 3.0]), "POINT M (1 2 3)", "[1.0,2.0]"),
        (W::le(3001).f(&[1.0, 2.0, 3.0, 4.0]), "POINT ZM (1 2 3 4)", "[1.0,2.0,3.0]"),
        (W::le(0x8000_0001).f(&[1.0, 2.0, 3.0]), "POINT Z (1 2 3)", "[1.0,2.0,3.0]"),
        (W::le(0x4000_0001).f(&[1.0, 2.0, 3.0]), "POINT M (1 2 3)", "[1.0,2.0]"),
        (
            W::le(0xE000_0001).u32(4326).f(&[1.0, 2.0, 3.0, 4.0]),
            "POINT ZM (1 2 3 4)",
            "[1.0,2.0,3.0]",
        ),
    ];
    for (w, wkt, coords) in cases {
        assert_eq!(both(&w), (wkt.into(), format!(r#"{{"type":"Point","coordinates":{coords}}}"#)));
    }
    let ls = W::le(3002).u32(1).f(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(
        both(&ls),
        (
            "LINESTRING ZM (1 2 3 4)".into(),
            r#"{"type":"LineString","coordinates":[[1.0,2.0,3.0]]}"#.into()
        )
    );
}

#[test]
fn ewkb_srid_is_skipped() {
    let w = W::le(0x2000_0001).u32(4326).f(&[1.0, 2.0]);
    assert_eq!(
        both(&w),
        ("POINT(1 2)".into(), r#"{"type":"Point","coordinates":[1.0,2.0]}"#.into())
    );
    // PostGIS text output: hex of the EWKB.
    let hex = "0101000020E6100000000000000000F03F0000000000000040";
    assert_eq!(
        call(GeoFn::AsText, &SqliteValue::Text(hex.into())),
        Ok(SqliteValue::Text("POINT(1 2)".into()))
    );
    // EWKB type codes are masked to the low nibble.
    let w = W::le(0x2000_0011).u32(4326).f(&[1.0, 2.0]);
    assert_eq!(text(GeoFn::AsText, &w), "POINT(1 2)");
}

#[test]
fn every_geometry_type() {
    let line = W::le(2).u32(2).f(&[1.0, 2.0, 3.5, -4.0]);
    assert_eq!(
        both(&line),
        (
            "LINESTRING(1 2,3.5 -4)".into(),
            r#"{"type":"LineString","coordinates":[[1.0,2.0],[3.5,-4.0]]}"#.into()
        )
    );
    let poly = W::le(3)
        .u32(2)
        .u32(4)
        .f(&[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 0.0])
        .u32(4)
        .f(&[1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 1.0]);
    assert_eq!(
        both(&poly),
        (
            "POLYGON((0 0,4 0,4 4,0 0),(1 1,2 1,2 2,1 1))".into(),
            r#"{"type":"Polygon","coordinates":[[[0.0,0.0],[4.0,0.0],[4.0,4.0],[0.0,0.0]],[[1.0,1.0],[2.0,1.0],[2.0,2.0],[1.0,1.0]]]}"#
                .into()
        )
    );
    let mp = W::le(4).u32(2).g(pt(1.0, 2.0)).g(W::be(1).f(&[3.0, 4.0]));
    assert_eq!(
        both(&mp),
        (
            "MULTIPOINT(1 2,3 4)".into(),
            r#"{"type":"MultiPoint","coordinates":[[1.0,2.0],[3.0,4.0]]}"#.into()
        )
    );
    let mls = W::le(5).u32(2).g(line.clone()).g(W::le(2).u32(1).f(&[0.0, 0.0]));
    assert_eq!(
        both(&mls),
        (
            "MULTILINESTRING((1 2,3.5 -4),(0 0))".into(),
            r#"{"type":"MultiLineString","coordinates":[[[1.0,2.0],[3.5,-4.0]],[[0.0,0.0]]]}"#.into()
        )
    );
    let tri = W::le(3).u32(1).u32(4).f(&[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    let mpoly = W::le(6).u32(1).g(tri);
    assert_eq!(
        both(&mpoly),
        (
            "MULTIPOLYGON(((0 0,1 0,1 1,0 0)))".into(),
            r#"{"type":"MultiPolygon","coordinates":[[[[0.0,0.0],[1.0,0.0],[1.0,1.0],[0.0,0.0]]]]}"#.into()
        )
    );
    let gc = W::le(7).u32(2).g(pt(1.0, 2.0)).g(line);
    assert_eq!(
        both(&gc),
        (
            "GEOMETRYCOLLECTION(POINT(1 2),LINESTRING(1 2,3.5 -4))".into(),
            r#"{"type":"GeometryCollection","geometries":[{"type":"Point","coordinates":[1.0,2.0]},{"type":"LineString","coordinates":[[1.0,2.0],[3.5,-4.0]]}]}"#.into()
        )
    );
    let zgc = W::le(0xC000_0007).u32(1).g(W::le(0xC000_0001).f(&[1.0, 2.0, 3.0, 4.0]));
    assert_eq!(text(GeoFn::AsText, &zgc), "GEOMETRYCOLLECTION ZM (POINT ZM (1 2 3 4))");
}

#[test]
fn empty_geometries() {
    let cases = [
        (2, "LINESTRING EMPTY", "LineString", "coordinates"),
        (3, "POLYGON EMPTY", "Polygon", "coordinates"),
        (4, "MULTIPOINT EMPTY", "MultiPoint", "coordinates"),
        (5, "MULTILINESTRING EMPTY", "MultiLineString", "coordinates"),
        (6, "MULTIPOLYGON EMPTY", "MultiPolygon", "coordinates"),
        (7, "GEOMETRYCOLLECTION EMPTY", "GeometryCollection", "geometries"),
    ];
    for (code, wkt, ty, key) in cases {
        let w = W::le(code).u32(0);
        assert_eq!(both(&w), (wkt.into(), format!(r#"{{"type":"{ty}","{key}":[]}}"#)));
    }
    assert_eq!(text(GeoFn::AsText, &W::le(1002).u32(0)), "LINESTRING Z EMPTY");
    // A WKB empty point is NaN, NaN.
    let nan = pt(f64::NAN, f64::NAN);
    assert_eq!(
        both(&nan),
        ("POINT(NaN NaN)".into(), r#"{"type":"Point","coordinates":[NaN,NaN]}"#.into())
    );
    assert!(matches!(run(GeoFn::X, &nan), Ok(SqliteValue::Real(x)) if x.is_nan()));
}

#[test]
fn wkx_quirks() {
    // Empty members: wkx's `slice(0, -1)` eats the opening parenthesis.
    let mls = W::le(5).u32(2).g(W::le(2).u32(1).f(&[1.0, 2.0])).g(W::le(2).u32(0));
    assert_eq!(
        both(&mls),
        (
            "MULTILINESTRING((1 2),))".into(),
            r#"{"type":"MultiLineString","coordinates":[[[1.0,2.0]],[]]}"#.into()
        )
    );
    assert_eq!(text(GeoFn::AsText, &W::le(6).u32(1).g(W::le(3).u32(0))), "MULTIPOLYGON(()))");
    // A polygon whose exterior ring is empty prints EMPTY in WKT only.
    let poly = W::le(3).u32(2).u32(0).u32(1).f(&[1.0, 2.0]);
    assert_eq!(
        both(&poly),
        ("POLYGON EMPTY".into(), r#"{"type":"Polygon","coordinates":[[[1.0,2.0]]]}"#.into())
    );
    // Members of any type.
    let mp = W::le(4).u32(2).g(pt(1.0, 2.0)).g(W::le(7).u32(0));
    assert_eq!(
        both(&mp),
        (
            "MULTIPOINT(1 2,undefined undefined)".into(),
            r#"{"type":"MultiPoint","coordinates":[[1.0,2.0],null]}"#.into()
        )
    );
    assert_eq!(
        err(&W::le(5).u32(1).g(pt(1.0, 2.0))),
        "this.lineStrings[i]._toInnerWkt is not a function"
    );
    assert_eq!(
        err(&W::le(6).u32(1).g(pt(1.0, 2.0))),
        "this.polygons[i]._toInnerWkt is not a function"
    );
    assert_eq!(
        text(GeoFn::AsText, &W::le(6).u32(1).g(W::le(2).u32(1).f(&[1.0, 2.0]))),
        "MULTIPOLYGON((1 2))"
    );
    // The parent's dimensions drive WKT, the member's GeoJSON.
    let mpz = W::le(1004).u32(1).g(pt(1.0, 2.0));
    assert_eq!(
        both(&mpz),
        (
            "MULTIPOINT Z (1 2 undefined)".into(),
            r#"{"type":"MultiPoint","coordinates":[[1.0,2.0]]}"#.into()
        )
    );
    let ewkb_child = W::le(0x2000_0004).u32(4326).u32(1).g(W::le(0x8000_0001).f(&[1.0, 2.0, 3.0]));
    assert_eq!(
        both(&ewkb_child),
        (
            "MULTIPOINT(1 2)".into(),
            r#"{"type":"MultiPoint","coordinates":[[1.0,2.0,3.0]]}"#.into()
        )
    );
    // Under an EWKB parent an ISO code is masked: 1001 & 0xF = 9.
    let iso_child = W::le(0x2000_0004).u32(4326).u32(1).g(W::le(1001).f(&[1.0, 2.0, 3.0]));
    assert_eq!(err(&iso_child), "GeometryType 9 not supported");
}

#[test]
fn numbers_use_js_formatting() {
    let w = W::le(2001).f(&[0.1, 1e21, -0.000001]);
    assert_eq!(
        both(&w),
        (
            "POINT M (0.1 1e+21 -0.000001)".into(),
            r#"{"type":"Point","coordinates":[0.1,1e+21]}"#.into()
        )
    );
    let w = pt(1e-7, -1.5e300);
    assert_eq!(
        both(&w),
        (
            "POINT(1e-7 -1.5e+300)".into(),
            r#"{"type":"Point","coordinates":[1e-7,-1.5e+300]}"#.into()
        )
    );
    let w = pt(-0.0, f64::INFINITY);
    assert_eq!(
        both(&w),
        (
            "POINT(0 Infinity)".into(),
            r#"{"type":"Point","coordinates":[0.0,Infinity]}"#.into()
        )
    );
    assert_eq!(json_number(Some(-5.0)), "-5.0");
    assert_eq!(json_number(Some(f64::NEG_INFINITY)), "-Infinity");
}

#[test]
fn inputs() {
    assert_eq!(call(GeoFn::AsText, &SqliteValue::Null), Ok(SqliteValue::Null));
    assert_eq!(call(GeoFn::AsText, &SqliteValue::Integer(1)), Ok(SqliteValue::Null));
    assert_eq!(call(GeoFn::X, &SqliteValue::Real(1.5)), Ok(SqliteValue::Null));
    assert_eq!(run(GeoFn::X, &W::le(2).u32(0)), Ok(SqliteValue::Null));
    assert_eq!(run(GeoFn::Y, &W::le(4).u32(1).g(pt(1.0, 2.0))), Ok(SqliteValue::Null));
    // Node hex decoding: lowercase ok, stops at the first bad pair, odd digit dropped.
    assert_eq!(node_hex("0102zz03"), vec![1, 2]);
    assert_eq!(node_hex("AbC"), vec![0xab]);
    assert_eq!(node_hex("0g01"), Vec::<u8>::new());
    assert_eq!(node_hex("é0102"), Vec::<u8>::new());
    let mut hex: String = pt(1.0, 2.0).0.iter().map(|b| format!("{b:02x}")).collect();
    hex.push_str("zz");
    assert_eq!(call(GeoFn::Y, &SqliteValue::Text(hex)), Ok(SqliteValue::Real(2.0)));
}

#[test]
fn malformed_input_errors() {
    let oob = "Attempt to access memory outside buffer bounds";
    assert_eq!(err(&W(vec![])), oob);
    assert_eq!(err(&W(vec![1])), oob);
    assert_eq!(err(&W::le(1)), oob);
    let mut short = pt(0.0, 0.0);
    short.0.truncate(18);
    assert_eq!(
        err(&short),
        r#"The value of "offset" is out of range. It must be >= 0 and <= 10. Received 13"#
    );
    assert_eq!(
        err(&W::le(0xFFFF_FFFF)),
        r#"The value of "offset" is out of range. It must be >= 0 and <= 1. Received 5"#
    );
    assert_eq!(err(&W::le(0)), "GeometryType 0 not supported");
    assert_eq!(err(&W::le(8)), "GeometryType 8 not supported");
    assert_eq!(err(&W::le(1000).u32(0)), "GeometryType 0 not supported");
    assert_eq!(err(&W::le(0x1000_0001).f(&[1.0, 2.0])), "GeometryType 268435457 not supported");
    // Huge counts fail at the first missing element without allocating.
    let range = |max: usize, at: usize| format!(r#"The value of "offset" is out of range. It must be >= 0 and <= {max}. Received {at}"#);
    for (code, max) in [(2, 1), (3, 5), (4, 8), (5, 8), (6, 8), (7, 8)] {
        assert_eq!(err(&W::le(code).u32(u32::MAX)), range(max, 9), "type {code}");
    }
    assert_eq!(err(&W::le(2).u32(u32::MAX).f(&[1.0; 3])), range(25, 33));
    assert_eq!(err(&W::le(7).u32(u32::MAX).f(&[1.0; 3])), "GeometryType 0 not supported");
    let poly = W::le(3).u32(u32::MAX).u32(0).u32(0);
    assert_eq!(
        err(&poly),
        r#"The value of "offset" is out of range. It must be >= 0 and <= 13. Received 17"#
    );
}

#[test]
fn nesting_is_capped() {
    let nested = |levels: usize| {
        let mut w = W::le(7).u32(0);
        for _ in 0..levels {
            w = W::le(7).u32(1).g(w);
        }
        w
    };
    let ok = nested(MAX_DEPTH);
    let wkt = text(GeoFn::AsText, &ok);
    assert!(wkt.starts_with("GEOMETRYCOLLECTION(GEOMETRYCOLLECTION("), "{wkt}");
    assert!(wkt.ends_with(&format!("GEOMETRYCOLLECTION EMPTY{}", ")".repeat(MAX_DEPTH))));
    assert_eq!(err(&nested(MAX_DEPTH + 1)), "Maximum call stack size exceeded");
    assert_eq!(err(&nested(100_000)), "Maximum call stack size exceeded");
}

#[test]
fn mutations_never_panic() {
    let line = W::le(2).u32(2).f(&[1.0, 2.0, 3.0, 4.0]);
    let seeds = [
        W::le(0xA000_0001).u32(4326).f(&[1.0, 2.0, 3.0]),
        W::le(3).u32(2).u32(1).f(&[0.0, 0.0]).u32(1).f(&[1.0, 1.0]),
        W::le(5).u32(2).g(line.clone()).g(W::be(3).u32(1).u32(1).f(&[1.0, 2.0])),
        W::le(7).u32(3).g(pt(1.0, 2.0)).g(line).g(W::le(4).u32(1).g(W::le(7).u32(0))),
    ];
    let fns = [GeoFn::AsGeoJson, GeoFn::AsText, GeoFn::X, GeoFn::Y];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for len in 0..=seed.0.len() {
            let cut = W(seed.0[..len].to_vec());
            fns.iter().for_each(|f| drop(run(*f, &cut)));
        }
        for _ in 0..2000 {
            let mut bytes = seed.0.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            fns.iter().for_each(|f| drop(run(*f, &W(bytes.clone()))));
        }
    }
}
