//! Reading the CSV dialect back (the inverse of [`super::csv`]), for the reference loader and
//! `verify`.
//!
//! # Contract
//! - A quoted field is a value (`""` the empty string, `"\N"` the two characters `\N`); an unquoted
//!   `\N` is NULL. Any other unquoted field is taken as its text (the header may have some).
//! - Records end at `\n` outside quotes (a `\r\n` end is accepted); the last one may lack it.
//! - Bad input (a quote inside an unquoted field, text after a closing quote, an unterminated quote,
//!   invalid UTF-8) is an error naming the record, never a panic.

/// One field: `None` is NULL.
pub type Field = Option<String>;

/// Splits `data` into records of fields.
pub fn read_records(data: &[u8]) -> Result<Vec<Vec<Field>>, String> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let (record, next) = read_record(data, pos)
            .map_err(|e| format!("CSV record {} (byte {pos}): {e}", records.len() + 1))?;
        records.push(record);
        pos = next;
    }
    Ok(records)
}

/// Reads the record starting at `pos`; returns it and the position after its line end.
fn read_record(data: &[u8], mut pos: usize) -> Result<(Vec<Field>, usize), String> {
    let mut fields = Vec::new();
    loop {
        let (field, next) = if data.get(pos) == Some(&b'"') {
            read_quoted(data, pos + 1)?
        } else {
            read_unquoted(data, pos)?
        };
        fields.push(field);
        pos = next;
        match data.get(pos) {
            Some(b',') => pos += 1,
            Some(b'\n') => return Ok((fields, pos + 1)),
            Some(b'\r') if data.get(pos + 1) == Some(&b'\n') => return Ok((fields, pos + 2)),
            None => return Ok((fields, pos)),
            Some(b) => return Err(format!("unexpected byte 0x{b:02x} after a field")),
        }
    }
}

fn read_quoted(data: &[u8], start: usize) -> Result<(Field, usize), String> {
    let mut value = Vec::new();
    let mut pos = start;
    loop {
        let Some(rel) = data[pos..].iter().position(|&b| b == b'"') else {
            return Err("a quoted value is not closed".into());
        };
        value.extend_from_slice(&data[pos..pos + rel]);
        pos += rel + 1;
        if data.get(pos) == Some(&b'"') {
            value.push(b'"');
            pos += 1;
        } else {
            let text = String::from_utf8(value).map_err(|_| "a value is not UTF-8".to_string())?;
            return Ok((Some(text), pos));
        }
    }
}

fn read_unquoted(data: &[u8], start: usize) -> Result<(Field, usize), String> {
    let end = data[start..]
        .iter()
        .position(|&b| matches!(b, b',' | b'\n' | b'\r'))
        .map_or(data.len(), |i| start + i);
    let raw = &data[start..end];
    if raw.contains(&b'"') {
        return Err("a quote inside an unquoted field".into());
    }
    if raw == b"\\N" {
        return Ok((None, end));
    }
    let text = std::str::from_utf8(raw).map_err(|_| "a field is not UTF-8".to_string())?;
    Ok((Some(text.to_string()), end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::encode::csv::push_value;
    use proptest::prelude::*;

    #[test]
    fn null_and_the_text_backslash_n_differ() {
        let r = read_records(b"a,\"b\"\n\\N,\"\\N\"\n\"\",\"x\"\"y\"\r\n").unwrap();
        assert_eq!(
            r,
            vec![
                vec![Some("a".into()), Some("b".into())],
                vec![None, Some("\\N".into())],
                vec![Some(String::new()), Some("x\"y".into())],
            ]
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(read_records(b"\"open").is_err());
        assert!(read_records(b"a\"b\n").is_err());
        assert!(read_records(b"\"a\"b\n").is_err());
        assert!(read_records(b"\"\xff\"\n").is_err());
    }

    proptest! {
        #[test]
        fn what_the_encoder_writes_reads_back(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(".*"), 1..5), 0..5)
        ) {
            let mut out = Vec::new();
            for row in &rows {
                for (i, v) in row.iter().enumerate() {
                    if i > 0 { out.push(b','); }
                    push_value(&mut out, v.as_deref().map(str::as_bytes));
                }
                out.push(b'\n');
            }
            prop_assert_eq!(read_records(&out).unwrap(), rows);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read_records(&data);
        }
    }
}
