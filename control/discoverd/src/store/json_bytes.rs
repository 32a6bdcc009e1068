//! Serde for snapshot data, which is itself JSON (the registry): embedded as a JSON value,
//! not as an array of byte numbers (about four times the size, and slow to parse). Reading
//! also takes the array form that earlier versions wrote to `snapshot.json` and sent.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    let raw: &RawValue = serde_json::from_slice(data)
        .map_err(|e| serde::ser::Error::custom(format!("snapshot data is not JSON: {e}")))?;
    raw.serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    let text = raw.get();
    if text.starts_with('[') {
        // The byte-array form.
        return serde_json::from_str::<Vec<u8>>(text).map_err(D::Error::custom);
    }
    Ok(text.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Holder {
        #[serde(with = "super")]
        data: Vec<u8>,
    }

    #[test]
    fn data_is_embedded_as_json_and_reads_back() {
        let data = br#"{"services":{"a":{"x":[1,2,"\u00e9"]}}}"#.to_vec();
        let h = Holder { data: data.clone() };
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(text.len(), data.len() + r#"{"data":}"#.len(), "{text}");
        let back: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(back.data, data);
    }

    #[test]
    fn the_byte_array_form_still_reads() {
        let data = br#"{"k":1}"#.to_vec();
        let old = serde_json::json!({ "data": data }).to_string();
        assert!(old.starts_with(r#"{"data":[123,"#), "{old}");
        let back: Holder = serde_json::from_str(&old).unwrap();
        assert_eq!(back.data, data);
    }

    #[test]
    fn data_that_is_not_json_is_an_error_not_garbage() {
        let h = Holder {
            data: b"{not json".to_vec(),
        };
        let e = serde_json::to_string(&h).unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }
}
