//! JSON request documents read as JSON Schema reads them: a number with no fractional part is an
//! integer (`2.0` is `2`), as the OpenAPI document's `integer` fields promise. serde alone would
//! refuse `2.0` for a `u64`, so documents pass through a `Value` whose integral floats are turned
//! into integers first.

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

/// Parses `bytes` into `T`, reading integral floats as integers.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let mut value: Value = serde_json::from_slice(bytes)?;
    integral_floats_to_integers(&mut value);
    T::deserialize(value)
}

fn integral_floats_to_integers(value: &mut Value) {
    match value {
        Value::Number(number) if number.is_f64() => {
            let float = number.as_f64().expect("an f64 number");
            // Exactly representable integers only: below 2^53 every integral f64 is exact.
            if float.fract() == 0.0 && float.abs() < 9_007_199_254_740_992.0 {
                *number = if float < 0.0 {
                    Number::from(float as i64)
                } else {
                    Number::from(float as u64)
                };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Doc {
        n: u64,
        list: Vec<i32>,
        ratio: f64,
    }

    #[test]
    fn integral_floats_are_integers_and_the_rest_stays() {
        let doc: Doc = from_slice(br#"{"n": 2.0, "list": [-3.0, 4], "ratio": 0.5}"#).unwrap();
        assert_eq!(
            doc,
            Doc {
                n: 2,
                list: vec![-3, 4],
                ratio: 0.5
            }
        );
        assert!(from_slice::<Doc>(br#"{"n": 2.5, "list": [], "ratio": 1}"#).is_err());
        assert!(from_slice::<Doc>(br#"{"n": 1e300, "list": [], "ratio": 1}"#).is_err());
    }
}
