//! Reads the Prometheus exposition the service's recorder renders, so the dashboard shows
//! exactly what a scrape would, without a second set of counters.

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text`; comments and lines that do not parse are skipped (the text comes
/// from our own recorder, so a bad line is a format this reader does not know, not an attack).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` (values escape `\`, `"` and newlines).
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end + 1..];
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_labelled_samples() {
        let text = "# HELP x Open\n# TYPE x gauge\npowersync_concurrent_connections 2\n\
            ferrosync_connections{transport=\"http\"} 1\n\
            ferrosync_snapshot_rows{table=\"public.t \\\"q\\\"\",other=\"a,b\"} 10000\n\
            ferrosync_checkpoint_fanout_seconds_bucket{le=\"+Inf\"} 3\nbroken line here\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 4, "{samples:?}");
        assert_eq!(samples[0].name, "powersync_concurrent_connections");
        assert_eq!(samples[0].value, 2.0);
        assert_eq!(samples[1].label("transport"), Some("http"));
        assert_eq!(samples[2].label("table"), Some("public.t \"q\""));
        assert_eq!(samples[2].label("other"), Some("a,b"));
        assert_eq!(samples[2].value, 10000.0);
        assert_eq!(samples[3].label("le"), Some("+Inf"));
    }
}
