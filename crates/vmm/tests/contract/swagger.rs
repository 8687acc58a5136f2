//! Firecracker's published API (`../firecracker-api-v1.16.1.yaml`, Swagger 2.0) as a checker
//! of requests: the path and method must be an operation of the spec, and the JSON body must
//! fit the operation's body schema — required fields, types, enums, minimum and maximum, and no
//! field the schema does not define unless it says `additionalProperties: true` (Firecracker's
//! request types refuse unknown fields, so that is the spec's meaning in practice).

use serde_json::{Map, Value};

/// The loaded spec.
pub struct Swagger {
    doc: Value,
}

/// YAML to JSON, with every map key as a string (the spec keys responses by number).
fn to_json(yaml: serde_yaml::Value) -> Value {
    match yaml {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or_default())
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        serde_yaml::Value::Mapping(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                let key = match key {
                    serde_yaml::Value::String(s) => s,
                    other => serde_yaml::to_string(&other).unwrap_or_default().trim().to_owned(),
                };
                out.insert(key, to_json(value));
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(tagged) => to_json(tagged.value),
    }
}

impl Swagger {
    /// Loads the spec shipped beside the tests.
    pub fn load() -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/firecracker-api-v1.16.1.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("the spec is YAML");
        let doc = to_json(yaml);
        assert_eq!(doc["swagger"], "2.0", "a Swagger 2.0 document");
        Self { doc }
    }

    /// The version the spec describes.
    pub fn version(&self) -> &str {
        self.doc["info"]["version"].as_str().unwrap_or_default()
    }

    /// The path template matching `path` (`/drives/{drive_id}` for `/drives/drive0`).
    fn template(&self, path: &str) -> Option<&str> {
        let paths = self.doc["paths"].as_object()?;
        let wanted: Vec<&str> = path.split('/').collect();
        paths.keys().map(String::as_str).find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == wanted.len()
                && parts.iter().zip(&wanted).all(|(t, w)| (t.starts_with('{') && !w.is_empty()) || t == w)
        })
    }

    /// Checks one request; the list of violations is empty when it fits the spec.
    pub fn check(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<String> {
        let Some(template) = self.template(path) else {
            return vec![format!("{method} {path}: no such path in the spec")];
        };
        let operation = &self.doc["paths"][template][method.to_ascii_lowercase()];
        if !operation.is_object() {
            return vec![format!("{method} {path}: the spec has no {method} on {template}")];
        }
        let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
        let body_param = parameters.iter().find(|p| p["in"] == "body");
        let mut violations = Vec::new();
        match (body_param, body) {
            (None, Some(_)) => violations.push(format!("{method} {path}: the operation takes no body")),
            (Some(param), None) if param["required"] == true => {
                violations.push(format!("{method} {path}: the body is required"));
            }
            (Some(param), Some(body)) => {
                self.validate(&param["schema"], body, &format!("{method} {path}"), &mut violations)
            }
            _ => {}
        }
        violations
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/definitions/")) {
            Some(name) => &self.doc["definitions"][name],
            None => schema,
        }
    }

    fn validate(&self, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if schema.is_null() {
            out.push(format!("{at}: schema not found"));
            return;
        }
        if let Some(kind) = schema["type"].as_str() {
            let fits = match kind {
                "object" => value.is_object(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "array" => value.is_array(),
                _ => true,
            };
            if !fits {
                out.push(format!("{at}: {value} is not of type {kind}"));
                return;
            }
        }
        if let Some(allowed) = schema["enum"].as_array() {
            let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            if !allowed.iter().any(|a| text(a) == text(value)) {
                out.push(format!("{at}: {value} is not one of {}", Value::Array(allowed.clone())));
            }
        }
        if let Some(n) = value.as_f64() {
            if schema["minimum"].as_f64().is_some_and(|min| n < min) {
                out.push(format!("{at}: {value} is below the minimum {}", schema["minimum"]));
            }
            if schema["maximum"].as_f64().is_some_and(|max| n > max) {
                out.push(format!("{at}: {value} is above the maximum {}", schema["maximum"]));
            }
        }
        if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object()) {
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !object.contains_key(required) {
                    out.push(format!("{at}: required field {required:?} is missing"));
                }
            }
            for (key, field) in object {
                match properties.get(key) {
                    Some(_) if field.is_null() => {
                        out.push(format!("{at}.{key}: null is not a value; leave the field out"));
                    }
                    Some(property) => self.validate(property, field, &format!("{at}.{key}"), out),
                    None if schema["additionalProperties"] == true => {}
                    None => out.push(format!("{at}: unknown field {key:?}")),
                }
            }
        }
        if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
            for (index, item) in items.iter().enumerate() {
                self.validate(schema, item, &format!("{at}[{index}]"), out);
            }
        }
    }
}

#[test]
fn the_checker_catches_what_firecracker_refuses() {
    let spec = Swagger::load();
    assert_eq!(spec.version(), "1.16.1");
    let ok = serde_json::json!({"action_type": "InstanceStart"});
    assert!(spec.check("PUT", "/actions", Some(&ok)).is_empty());
    let bad = |method: &str, path: &str, body: Value| spec.check(method, path, Some(&body)).join("; ");
    assert!(bad("PUT", "/actions", serde_json::json!({"action_type": "Boot"})).contains("is not one of"));
    assert!(bad("PUT", "/actions", serde_json::json!({})).contains("required field \"action_type\""));
    assert!(bad("PUT", "/machine-config", serde_json::json!({"vcpu_count": 64, "mem_size_mib": 1}))
        .contains("above the maximum"));
    assert!(bad("PUT", "/machine-config", serde_json::json!({"vcpu_count": "2", "mem_size_mib": 1}))
        .contains("not of type integer"));
    assert!(bad("PUT", "/vsock", serde_json::json!({"guest_cid": 3, "uds_path": "/x", "cid": 3}))
        .contains("unknown field \"cid\""));
    assert!(bad("PUT", "/boot-source", serde_json::json!({"kernel_image_path": "/k", "initrd_path": null}))
        .contains("leave the field out"));
    assert!(bad("PUT", "/drives/drive0", serde_json::json!({"drive_id": "d", "is_root_device": false})).is_empty());
    assert!(bad("POST", "/actions", ok.clone()).contains("no POST"));
    assert!(bad("PUT", "/nowhere", ok).contains("no such path"));
    assert!(spec.check("GET", "/", None).is_empty());
    assert!(spec.check("PUT", "/vm", None).join("").contains("no PUT"));
}
