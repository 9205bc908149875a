//! The CSV dialect, shared by streaming batches and reload parts (README.md "CSV dialect").
//!
//! # Contract
//! - RFC 4180, UTF-8, `,` delimiter, `\n` line ends, one header row.
//! - Every non-NULL value is written inside double quotes with `"` doubled; NULL is an unquoted `\N`.
//!   So `""` is the empty string and `"\N"` is the two-character string `\N`: the two can never be
//!   confused, and `COPY … FROM (FORMAT csv, HEADER, NULL '\N')` reads every value back exactly.
//! - This is byte-for-byte what PostgreSQL writes for the data rows with
//!   `COPY … TO STDOUT (FORMAT csv, HEADER, NULL '\N', FORCE_QUOTE *)`; the header follows COPY's rule
//!   too (a name is quoted only when it needs to be).
//! - Value bytes are copied as they come (PostgreSQL text output); nothing is re-encoded.
//!
//! Streaming files carry the metadata columns [`METADATA_COLUMNS`] before the table's columns.

/// Metadata columns of streaming files, in order.
pub const METADATA_COLUMNS: [&str; 7] = [
    "_op",
    "_commit_lsn",
    "_seq",
    "_xid",
    "_commit_ts",
    "_before",
    "_unchanged",
];

/// Appends one value: `"…"` with quotes doubled, or `\N` for NULL. Does not write a delimiter.
#[inline]
pub fn push_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(b"\\N"),
        Some(v) => {
            out.reserve(v.len() + 2);
            out.push(b'"');
            let mut rest = v;
            while let Some(i) = rest.iter().position(|&b| b == b'"') {
                out.extend_from_slice(&rest[..=i]);
                out.push(b'"');
                rest = &rest[i + 1..];
            }
            out.extend_from_slice(rest);
            out.push(b'"');
        }
    }
}

/// Appends a header row (names quoted only when they contain a delimiter, quote, CR/LF, or are `\.`
/// or would read as NULL), ending with `\n`.
pub fn push_header<'a>(out: &mut Vec<u8>, names: impl IntoIterator<Item = &'a str>) {
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let needs_quote = name.is_empty()
            || name == "\\N"
            || name == "\\."
            || name
                .bytes()
                .any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'));
        if needs_quote {
            push_value(out, Some(name.as_bytes()));
        } else {
            out.extend_from_slice(name.as_bytes());
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_value(&mut out, *v);
        }
        out.push(b'\n');
        out
    }

    #[test]
    fn dialect_examples() {
        assert_eq!(row(&[None, Some(b""), Some(b"\\N")]), b"\\N,\"\",\"\\N\"\n");
        assert_eq!(
            row(&[Some(b"a\"b"), Some(b"x,\ny")]),
            b"\"a\"\"b\",\"x,\ny\"\n"
        );
        let mut h = Vec::new();
        push_header(&mut h, ["_op", "id", "a,b", "q\""]);
        assert_eq!(h, b"_op,id,\"a,b\",\"q\"\"\"\n");
    }

    fn value() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(String::new())),
            1 => Just(Some("\\N".to_string())),
            6 => proptest::option::of(any::<String>()),
            3 => proptest::option::of("[\"',\r\n\\\\Na é🦀]{0,12}"),
        ]
    }

    proptest! {
        /// Whatever the values, a standard CSV reader gets them back, with `\N` (unquoted) meaning NULL.
        #[test]
        fn round_trips_through_a_csv_reader(rows in proptest::collection::vec(proptest::collection::vec(value(), 3), 1..8)) {
            let mut out = Vec::new();
            push_header(&mut out, ["a", "b", "c"]);
            for r in &rows {
                let vals: Vec<Option<&[u8]>> = r.iter().map(|v| v.as_deref().map(str::as_bytes)).collect();
                out.extend_from_slice(&row(&vals));
            }
            let mut rdr = ::csv::ReaderBuilder::new().has_headers(true).from_reader(&out[..]);
            let mut got = Vec::new();
            let mut rec = ::csv::ByteRecord::new();
            while rdr.read_byte_record(&mut rec).unwrap() {
                let pos = rec.position().unwrap().byte() as usize;
                // A field is NULL exactly when it is the unquoted two bytes `\N` in the raw text.
                let mut fields = Vec::new();
                let mut raw_at = pos;
                for (i, f) in rec.iter().enumerate() {
                    let quoted = out[raw_at] == b'"';
                    fields.push(if !quoted && f == b"\\N" { None } else { Some(String::from_utf8(f.to_vec()).unwrap()) });
                    // advance raw_at past this field in the raw buffer
                    if quoted {
                        let mut j = raw_at + 1;
                        loop {
                            if out[j] == b'"' { if out.get(j + 1) == Some(&b'"') { j += 2; continue; } break; }
                            j += 1;
                        }
                        raw_at = j + 1;
                    } else {
                        raw_at += f.len();
                    }
                    if i + 1 < rec.len() { raw_at += 1; }
                }
                got.push(fields);
            }
            prop_assert_eq!(got, rows);
        }
    }
}
