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
#[path = "geo_tests.rs"]
mod tests;
