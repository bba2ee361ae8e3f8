//! PostGIS helpers `st_asgeojson`, `st_astext`, `st_x` and `st_y` (spec
//! §3.5). PostGIS geometry arrives as TEXT hex of the (E)WKB (§3.1); a BLOB is
//! taken as the WKB bytes themselves.
//!
//! The reference parses the bytes with the npm package `@syncpoint/wkx` (a fork
//! of `wkx` 0.5) and prints with its `toWkt()` / `toGeoJSON()`, the latter
//! serialised with `JSONBig.stringify`. This module reproduces that
//! behaviour, quirks included:
//!
//! - Input: NULL, INTEGER and REAL give NULL. TEXT is decoded like Node's
//!   `Buffer.from(text, 'hex')`: pairs of hex digits up to the first invalid
//!   pair, an odd trailing digit is dropped.
//! - Byte order byte `0` is big endian, any other value little endian; every
//!   nested geometry reads its own. Type codes: ISO 1000/2000/3000 offsets for
//!   Z/M/ZM, or the EWKB flags `0x80000000` (Z), `0x40000000` (M) and
//!   `0x20000000` (SRID follows, read and ignored). With any EWKB flag (or an
//!   EWKB parent) the geometry type is `code & 0xF`.
//! - Children of Multi* and GeometryCollection are parsed as any geometry
//!   type (as wkx does), so a MultiPoint may hold a LineString: its WKT then
//!   prints `undefined undefined` for that member, and a MultiLineString or
//!   MultiPolygon member without rings is the JS `TypeError` wkx raises.
//! - WKT: `POINT(1 2)`, `POINT Z (1 2 3)`, `LINESTRING M (1 2 3)`,
//!   `POLYGON ZM ((…),(…))`, `MULTIPOINT(1 2,3 4)` (no inner parentheses),
//!   `POINT EMPTY` / `POINT Z EMPTY`; numbers use JS `Number#toString`. A WKB
//!   empty point is NaN coordinates and prints `POINT(NaN NaN)`.
//! - GeoJSON: `{"type":…,"coordinates":…}` (`"geometries"` for a
//!   collection), no `crs`; Z is kept, M dropped; numbers use the lossless
//!   JSON rule (integral values get `.0`; NaN and ±Infinity are printed bare,
//!   as `JSONBig` does).
//! - Errors are the messages Node/wkx throw: out-of-bounds reads give Node's
//!   `RangeError` texts, unknown types `GeometryType N not supported`.
//!
//! Malformed input never panics: reads are bounds-checked, allocations are
//! capped by the bytes left, and nesting deeper than [`MAX_DEPTH`] is the error
//! `Maximum call stack size exceeded` (the reference overflows its JS stack
//! at roughly 2 000–3 000 levels; ferrosync stops earlier).

use crate::value::{js_number, SqliteValue};

/// Deepest nesting of collections accepted (the root is depth 0).
pub(crate) const MAX_DEPTH: usize = 256;

/// Smallest encoding of a nested geometry: byte order, type and a count.
const MIN_GEOMETRY_BYTES: usize = 9;

/// Which PostGIS function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum GeoFn {
    AsGeoJson,
    AsText,
    X,
    Y,
}

/// Evaluates a geometry function on its one argument.
pub(crate) fn call(f: GeoFn, v: &SqliteValue) -> Result<SqliteValue, String> {
    let bytes = match v {
        SqliteValue::Blob(b) => b.clone(),
        SqliteValue::Text(t) => node_hex(t),
        _ => return Ok(SqliteValue::Null),
    };
    let geo = parse(&bytes)?;
    Ok(match f {
        GeoFn::AsGeoJson => SqliteValue::Text(geo.geojson()),
        GeoFn::AsText => SqliteValue::Text(geo.wkt()?),
        GeoFn::X | GeoFn::Y => match &geo.kind {
            Kind::Point(c) => {
                let n = if f == GeoFn::X { c.x } else { c.y };
                n.map_or(SqliteValue::Null, SqliteValue::Real)
            }
            _ => SqliteValue::Null,
        },
    })
}

/// Node's `Buffer.from(text, 'hex')`: stops at the first pair that is not
/// two hex digits.
fn node_hex(text: &str) -> Vec<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    text.as_bytes()
        .chunks_exact(2)
        .map_while(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect()
}

/// One position; `None` is a JS `undefined` coordinate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Coord {
    x: Option<f64>,
    y: Option<f64>,
    z: Option<f64>,
    m: Option<f64>,
}

#[derive(Debug, PartialEq)]
enum Kind {
    Point(Coord),
    LineString(Vec<Coord>),
    Polygon { exterior: Vec<Coord>, interiors: Vec<Vec<Coord>> },
    MultiPoint(Vec<Geometry>),
    MultiLineString(Vec<Geometry>),
    MultiPolygon(Vec<Geometry>),
    Collection(Vec<Geometry>),
}

/// A parsed geometry, shaped like wkx's objects.
#[derive(Debug, PartialEq)]
struct Geometry {
    has_z: bool,
    has_m: bool,
    kind: Kind,
}

/// Parses (E)WKB bytes the way `wkx.Geometry.parse(buffer)` does.
fn parse(bytes: &[u8]) -> Result<Geometry, String> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        big_endian: false,
    };
    parse_geometry(&mut r, false, 0)
}

/// A cursor with Node `Buffer` read semantics and error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let Some(bytes) = self.buf.get(self.pos..self.pos + N) else {
            return Err(match self.buf.len().checked_sub(N) {
                None => "Attempt to access memory outside buffer bounds".to_string(),
                Some(max) => {
                    format!(
                        "The value of \"offset\" is out of range. It must be >= 0 and <= {max}. Received {}",
                        self.pos
                    )
                }
            });
        };
        self.pos += N;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        if self.big_endian {
            out.reverse();
        }
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        self.take::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.take().map(u32::from_le_bytes)
    }

    fn f64(&mut self) -> Result<f64, String> {
        self.take().map(f64::from_le_bytes)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// `Point._readWkbPoint`.
    fn coord(&mut self, has_z: bool, has_m: bool) -> Result<Coord, String> {
        let (x, y) = (self.f64()?, self.f64()?);
        let z = if has_z { Some(self.f64()?) } else { None };
        let m = if has_m { Some(self.f64()?) } else { None };
        Ok(Coord {
            x: Some(x),
            y: Some(y),
            z,
            m,
        })
    }

    /// A count-prefixed list of positions.
    fn coords(&mut self, has_z: bool, has_m: bool) -> Result<Vec<Coord>, String> {
        let n = self.u32()? as usize;
        let size = 16 + 8 * (usize::from(has_z) + usize::from(has_m));
        let mut out = Vec::with_capacity(n.min(self.remaining() / size));
        for _ in 0..n {
            out.push(self.coord(has_z, has_m)?);
        }
        Ok(out)
    }
}

/// `Geometry._parseWkb(reader, parentOptions)`.
fn parse_geometry(r: &mut Reader, parent_ewkb: bool, depth: usize) -> Result<Geometry, String> {
    if depth > MAX_DEPTH {
        return Err("Maximum call stack size exceeded".into());
    }
    r.big_endian = r.u8()? == 0;
    let code = r.u32()?;
    let is_ewkb = code & 0xE000_0000 != 0;
    if code & 0x2000_0000 != 0 {
        r.u32()?; // SRID: not part of any output
    }
    let (ty, has_z, has_m) = if !is_ewkb && !parent_ewkb {
        match code {
            1000..=1999 => (code - 1000, true, false),
            2000..=2999 => (code - 2000, false, true),
            3000..=3999 => (code - 3000, true, true),
            _ => (code, false, false),
        }
    } else {
        (code & 0xF, code & 0x8000_0000 != 0, code & 0x4000_0000 != 0)
    };
    let kind = match ty {
        1 => Kind::Point(r.coord(has_z, has_m)?),
        2 => Kind::LineString(r.coords(has_z, has_m)?),
        3 => {
            let rings = r.u32()? as usize;
            let mut exterior = Vec::new();
            let mut interiors = Vec::with_capacity(rings.saturating_sub(1).min(r.remaining() / 4));
            if rings > 0 {
                exterior = r.coords(has_z, has_m)?;
                for _ in 1..rings {
                    interiors.push(r.coords(has_z, has_m)?);
                }
            }
            Kind::Polygon { exterior, interiors }
        }
        4..=7 => {
            let n = r.u32()? as usize;
            let mut children = Vec::with_capacity(n.min(r.remaining() / MIN_GEOMETRY_BYTES));
            for _ in 0..n {
                children.push(parse_geometry(r, is_ewkb, depth + 1)?);
            }
            match ty {
                4 => Kind::MultiPoint(children),
                5 => Kind::MultiLineString(children),
                6 => Kind::MultiPolygon(children),
                _ => Kind::Collection(children),
            }
        }
        _ => return Err(format!("GeometryType {ty} not supported")),
    };
    Ok(Geometry { has_z, has_m, kind })
}

/// A coordinate in WKT (`undefined` for a missing one, as JS concatenation
/// prints it).
fn wkt_number(n: Option<f64>) -> String {
    n.map_or_else(|| "undefined".to_string(), js_number)
}

/// A number in `JSONBig.stringify` output: integral texts get `.0`; an
/// undefined array element prints `null`.
fn json_number(n: Option<f64>) -> String {
    let Some(n) = n else {
        return "null".into();
    };
    let s = js_number(n);
    let digits = s.strip_prefix('-').unwrap_or(&s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        s + ".0"
    } else {
        s
    }
}

impl Geometry {
    fn type_names(&self) -> (&'static str, &'static str) {
        match self.kind {
            Kind::Point(_) => ("POINT", "Point"),
            Kind::LineString(_) => ("LINESTRING", "LineString"),
            Kind::Polygon { .. } => ("POLYGON", "Polygon"),
            Kind::MultiPoint(_) => ("MULTIPOINT", "MultiPoint"),
            Kind::MultiLineString(_) => ("MULTILINESTRING", "MultiLineString"),
            Kind::MultiPolygon(_) => ("MULTIPOLYGON", "MultiPolygon"),
            Kind::Collection(_) => ("GEOMETRYCOLLECTION", "GeometryCollection"),
        }
    }

    /// `_getWktType`.
    fn wkt_type(&self, empty: bool) -> String {
        let mut s = self.type_names().0.to_string();
        s += match (self.has_z, self.has_m) {
            (true, true) => " ZM ",
            (true, false) => " Z ",
            (false, true) => " M ",
            (false, false) if empty => " ",
            (false, false) => "",
        };
        if empty {
            s += "EMPTY";
        }
        s
    }

    /// `_getWktCoordinate`: the flags are this geometry's, not the point's.
    fn wkt_coord(&self, c: &Coord) -> String {
        let mut s = format!("{} {}", wkt_number(c.x), wkt_number(c.y));
        if self.has_z {
            s = s + " " + &wkt_number(c.z);
        }
        if self.has_m {
            s = s + " " + &wkt_number(c.m);
        }
        s
    }

    /// `(` + items joined by `,` + `)`, with wkx's `slice(0, -1)`: no items
    /// leave just `)`.
    fn wkt_list<T>(&self, open: &str, items: &[T], item: impl Fn(&T) -> Result<String, String>) -> Result<String, String> {
        let mut s = open.to_string();
        for i in items {
            s += &item(i)?;
            s.push(',');
        }
        s.pop();
        s.push(')');
        Ok(s)
    }

    /// `_toInnerWkt` of a LineString or Polygon; `None` for other types.
    fn inner_wkt(&self) -> Option<String> {
        let coord = |c: &Coord| Ok(self.wkt_coord(c));
        match &self.kind {
            Kind::LineString(points) => self.wkt_list("(", points, coord).ok(),
            Kind::Polygon { exterior, interiors } => {
                let mut s = self.wkt_list("((", exterior, coord).ok()?;
                for ring in interiors {
                    s += &self.wkt_list(",(", ring, coord).ok()?;
                }
                s.push(')');
                Some(s)
            }
            _ => None,
        }
    }

    /// `toWkt()`.
    fn wkt(&self) -> Result<String, String> {
        let empty = match &self.kind {
            Kind::Point(c) => *c == Coord::default(),
            Kind::LineString(v) => v.is_empty(),
            Kind::Polygon { exterior, .. } => exterior.is_empty(),
            Kind::MultiPoint(v) | Kind::MultiLineString(v) | Kind::MultiPolygon(v) | Kind::Collection(v) => v.is_empty(),
        };
        if empty {
            return Ok(self.wkt_type(true));
        }
        let body = match &self.kind {
            Kind::Point(c) => format!("({})", self.wkt_coord(c)),
            Kind::LineString(_) | Kind::Polygon { .. } => self.inner_wkt().unwrap_or_default(),
            Kind::MultiPoint(v) => self.wkt_list("(", v, |g| {
                let c = match &g.kind {
                    Kind::Point(c) => *c,
                    _ => Coord::default(),
                };
                Ok(self.wkt_coord(&c))
            })?,
            Kind::MultiLineString(v) => self.wkt_list("(", v, |g| {
                g.inner_wkt()
                    .ok_or_else(|| "this.lineStrings[i]._toInnerWkt is not a function".to_string())
            })?,
            Kind::MultiPolygon(v) => self.wkt_list("(", v, |g| {
                g.inner_wkt()
                    .ok_or_else(|| "this.polygons[i]._toInnerWkt is not a function".to_string())
            })?,
            Kind::Collection(v) => self.wkt_list("(", v, |g| g.wkt())?,
        };
        Ok(self.wkt_type(false) + &body)
    }

    /// A position array of `toGeoJSON()`: Z only if `with_z`.
    fn json_position(c: &Coord, with_z: bool) -> String {
        let mut s = format!("[{},{}", json_number(c.x), json_number(c.y));
        if with_z {
            s = s + "," + &json_number(c.z);
        }
        s + "]"
    }

    fn json_ring(&self, ring: &[Coord]) -> String {
        let items: Vec<String> = ring.iter().map(|c| Self::json_position(c, self.has_z)).collect();
        format!("[{}]", items.join(","))
    }

    /// `toGeoJSON().coordinates`; `None` (JS `undefined`) for a collection.
    fn json_coordinates(&self) -> Option<String> {
        let members = |v: &[Geometry]| {
            let items: Vec<String> = v.iter().map(|g| g.json_coordinates().unwrap_or_else(|| "null".into())).collect();
            format!("[{}]", items.join(","))
        };
        Some(match &self.kind {
            Kind::Point(c) if c.x.is_none() && c.y.is_none() => "[]".into(),
            Kind::Point(c) => Self::json_position(c, c.z.is_some()),
            Kind::LineString(points) => self.json_ring(points),
            Kind::Polygon { exterior, interiors } => {
                let rings: Vec<String> = (!exterior.is_empty())
                    .then_some(exterior)
                    .into_iter()
                    .chain(interiors)
                    .map(|r| self.json_ring(r))
                    .collect();
                format!("[{}]", rings.join(","))
            }
            Kind::MultiPoint(v) | Kind::MultiLineString(v) | Kind::MultiPolygon(v) => members(v),
            Kind::Collection(_) => return None,
        })
    }

    /// `JSONBig.stringify(toGeoJSON())`.
    fn geojson(&self) -> String {
        let ty = self.type_names().1;
        if let Kind::Collection(v) = &self.kind {
            let items: Vec<String> = v.iter().map(Geometry::geojson).collect();
            return format!("{{\"type\":\"{ty}\",\"geometries\":[{}]}}", items.join(","));
        }
        let coords = self.json_coordinates().unwrap_or_default();
        format!("{{\"type\":\"{ty}\",\"coordinates\":{coords}}}")
    }
}

#[cfg(test)]
mod tests {
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
        let range =
            |max: usize, at: usize| format!(r#"The value of "offset" is out of range. It must be >= 0 and <= {max}. Received {at}"#);
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
}
