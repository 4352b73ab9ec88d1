//! The one reader of Subscription input, for the API and for Subscriptions written into the
//! store, in every supported form: R5/R6 natively, R4 and R4B as the Backport IG profiles
//! them. It checks what the resource says (types, cardinality, codes, unknown elements) and
//! nothing of this server's policy; [`super::check`] does that. Anything that narrows what a
//! subscriber receives (`filterBy`, `content`, `maxCount`, the topic) is read or refused,
//! never skipped.

use serde_json::Value;

use super::element::{self, check_string, integer, structure, value, Extension, Obj};
use super::{Content, Filter, Invalid, Status};
use crate::fhir::topic::resource_type_of;
use crate::fhir::vocab::Format;

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

const STATUS: &[&str] = &["requested", "active", "error", "off", "entered-in-error"];
const CONTENT: &[&str] = &["empty", "id-only", "full-resource"];
const COMPARATORS: &[&str] = &["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];
/// `search-modifier-code`, plus `=` and `eq`, which early drafts of the form used for "no
/// modifier".
const MODIFIERS: &[&str] = &[
    "=",
    "eq",
    "missing",
    "exact",
    "contains",
    "not",
    "text",
    "in",
    "not-in",
    "below",
    "above",
    "type",
    "identifier",
    "of-type",
    "code-text",
    "text-advanced",
    "iterate",
];

/// Where the elements the policy checks live in the form read, for its refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paths {
    pub(crate) topic: &'static str,
    pub(crate) channel: &'static str,
    pub(crate) endpoint: &'static str,
    pub(crate) content_type: &'static str,
    pub(crate) status: &'static str,
}

const R5_PATHS: Paths = Paths {
    topic: "Subscription.topic",
    channel: "Subscription.channelType",
    endpoint: "Subscription.endpoint",
    content_type: "Subscription.contentType",
    status: "Subscription.status",
};

const BACKPORT_PATHS: Paths = Paths {
    topic: "Subscription.criteria",
    channel: "Subscription.channel.type",
    endpoint: "Subscription.channel.endpoint",
    content_type: "Subscription.channel.payload",
    status: "Subscription.status",
};

/// A Subscription as read, before any policy: what the resource says, in R5 terms.
#[derive(Debug, Clone)]
pub struct Read {
    pub status: Status,
    pub topic_url: String,
    pub channel: String,
    pub endpoint: Option<String>,
    pub content: Content,
    pub content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    pub heartbeat_period: Option<i32>,
    pub timeout: Option<i32>,
    pub max_count: Option<i32>,
    pub end: Option<chrono::DateTime<chrono::Utc>>,
    pub filters: Vec<Filter>,
    /// The secret notifications are signed with (the signing-secret extension).
    pub(crate) signing_secret: Option<String>,
    pub(crate) paths: Paths,
}

/// The extension that carries a subscription's signing secret: Medplum's, so receivers
/// written for Medplum verify fhir-cdc's notifications unchanged.
pub(super) const SECRET_EXTENSION: &str =
    "https://www.medplum.com/fhir/StructureDefinition/subscription-secret";

/// The signing secret of a Subscription, when it has the extension: a `valueString` of at
/// least 16 characters.
fn signing_secret(v: &Value) -> Result<Option<String>, Invalid> {
    let Some(exts) = v.get("extension").and_then(Value::as_array) else {
        return Ok(None);
    };
    for (i, e) in exts.iter().enumerate() {
        if e.get("url").and_then(Value::as_str) != Some(SECRET_EXTENSION) {
            continue;
        }
        let path = format!("Subscription.extension[{i}]");
        let secret = e
            .get("valueString")
            .and_then(Value::as_str)
            .ok_or_else(|| value(&path, "the signing-secret extension needs a valueString"))?;
        if secret.chars().count() < 16 {
            return Err(value(
                &path,
                "a signing secret needs at least 16 characters",
            ));
        }
        return Ok(Some(secret.to_string()));
    }
    Ok(None)
}

/// Reads a Subscription of the given format.
pub fn read(v: &Value, format: Format) -> Result<Read, Invalid> {
    let mut o = Obj::new("Subscription", v)?;
    element::scan("Subscription", v, 0)?;
    match o.string("resourceType")? {
        Some("Subscription") => {}
        _ => {
            return Err(structure(
                "Subscription.resourceType",
                "resourceType must be Subscription",
            ))
        }
    }
    resource_elements(&mut o)?;
    let mut read = if format == Format::R5 {
        read_r5(o)?
    } else {
        read_backport(o)?
    };
    read.signing_secret = signing_secret(v)?;
    Ok(read)
}

/// Elements every resource may have. A modifier extension this server does not know
/// changes the meaning of the resource: refused, as FHIR requires.
fn resource_elements(o: &mut Obj<'_>) -> Result<(), Invalid> {
    if let Some(id) = o.string("id")? {
        let ok = id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(value("Subscription.id", "Subscription.id is not a FHIR id"));
        }
    }
    o.opaque_object("meta")?;
    o.string("implicitRules")?;
    o.string("language")?;
    o.opaque_object("text")?;
    o.opaque_objects("contained")?;
    o.extensions("extension")?;
    refuse_modifier_extensions(o)
}

fn refuse_modifier_extensions(o: &mut Obj<'_>) -> Result<(), Invalid> {
    if let Some(e) = o.extensions("modifierExtension")?.first() {
        return Err(Invalid {
            code: "not-supported",
            message: format!(
                "modifier extension {} is not understood by this server",
                e.url
            ),
            expression: e.path.clone(),
        });
    }
    Ok(())
}

fn status(o: &mut Obj<'_>) -> Result<Status, Invalid> {
    Ok(match o.code("status", STATUS)? {
        // Absent: taken as requested (the handshake decides activation either way).
        None => Status::Requested,
        Some("entered-in-error") => {
            return Err(Invalid {
                code: "not-supported",
                message: "Subscription.status entered-in-error cannot be created or updated".into(),
                expression: "Subscription.status".into(),
            })
        }
        Some(s) => Status::parse(s).unwrap_or(Status::Requested),
    })
}

fn end(o: &mut Obj<'_>) -> Result<Option<chrono::DateTime<chrono::Utc>>, Invalid> {
    let Some(e) = o.string("end")? else {
        return Ok(None);
    };
    chrono::DateTime::parse_from_rfc3339(e)
        .map(|t| Some(t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            value(
                "Subscription.end",
                format!("Subscription.end {e:?} is not a FHIR instant"),
            )
        })
}

fn content(code: Option<&str>) -> Content {
    code.and_then(Content::parse).unwrap_or(Content::Empty)
}

fn read_r5(mut o: Obj<'_>) -> Result<Read, Invalid> {
    let status = status(&mut o)?;
    let end = end(&mut o)?;
    o.opaque_objects("identifier")?;
    o.string("name")?;
    o.opaque_objects("contact")?;
    o.opaque_object("managingEntity")?;
    o.string("reason")?;
    let topic_url = o.required_string("topic")?.to_string();
    let channel = channel_type(o.object("channelType")?)?;
    let filters = o
        .objects("filterBy")?
        .into_iter()
        .map(filter_by)
        .collect::<Result<Vec<_>, _>>()?;
    let headers = o
        .objects("parameter")?
        .into_iter()
        .map(parameter)
        .collect::<Result<Vec<_>, _>>()?;
    let read = Read {
        status,
        topic_url,
        channel,
        endpoint: o.string("endpoint")?.map(str::to_string),
        content: content(o.code("content", CONTENT)?),
        content_type: o
            .string("contentType")?
            .unwrap_or("application/fhir+json")
            .to_string(),
        headers,
        heartbeat_period: o.integer("heartbeatPeriod", 0)?,
        timeout: o.integer("timeout", 0)?,
        max_count: o.integer("maxCount", 1)?,
        end,
        filters,
        signing_secret: None,
        paths: R5_PATHS,
    };
    o.finish()?;
    Ok(read)
}

fn channel_type(c: Option<Obj<'_>>) -> Result<String, Invalid> {
    let Some(mut c) = c else {
        return Err(element::required("Subscription.channelType"));
    };
    c.string("id")?;
    c.extensions("extension")?;
    c.string("system")?;
    c.string("version")?;
    c.string("display")?;
    c.boolean("userSelected")?;
    let code = c.required_string("code")?.to_string();
    c.finish()?;
    Ok(code)
}

fn filter_by(mut f: Obj<'_>) -> Result<Filter, Invalid> {
    f.string("id")?;
    f.extensions("extension")?;
    refuse_modifier_extensions(&mut f)?;
    let resource_type = f
        .string("resourceType")?
        .map(|r| resource_type_of(r).to_string());
    let parameter = f.required_string("filterParameter")?;
    let comparator = f.code("comparator", COMPARATORS)?.map(str::to_string);
    let modifier = f
        .code("modifier", MODIFIERS)?
        .filter(|m| *m != "=" && *m != "eq");
    let value = f.required_string("value")?.to_string();
    let path = f.path.clone();
    f.finish()?;
    let (parameter, in_name) = match parameter.split_once(':') {
        Some((p, m)) => (p, Some(m.to_string())),
        None => (parameter, None),
    };
    Ok(Filter {
        resource_type,
        parameter: parameter.to_string(),
        comparator,
        modifier: modifier.map(str::to_string).or(in_name),
        value,
        source: path,
    })
}

fn parameter(mut p: Obj<'_>) -> Result<(String, String), Invalid> {
    p.string("id")?;
    p.extensions("extension")?;
    refuse_modifier_extensions(&mut p)?;
    let name = p.required_string("name")?;
    let value = p.required_string("value")?;
    let path = p.path.clone();
    p.finish()?;
    header(&path, name, value)
}

/// A header the HTTP channel can send: a token name, a value without control characters.
pub(super) fn header(path: &str, name: &str, value: &str) -> Result<(String, String), Invalid> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && value.bytes().all(|b| b >= 0x20 && b != 0x7f);
    if ok {
        Ok((name.to_string(), value.to_string()))
    } else {
        Err(element::value(
            path,
            format!("header {name:?} cannot be sent as an HTTP header"),
        ))
    }
}

fn read_backport(mut o: Obj<'_>) -> Result<Read, Invalid> {
    // An R5-shaped Subscription sent to an R4/R4B server: say so rather than list its
    // elements as unknown.
    if o.string("topic").is_ok_and(|t| t.is_some()) {
        return Err(Invalid {
            code: "not-supported",
            message: "this server takes Subscriptions in the R4/R4B Backport IG form (criteria = topic canonical, channel); R5 Subscriptions are not supported".into(),
            expression: "Subscription.topic".into(),
        });
    }
    let status = status(&mut o)?;
    let end = end(&mut o)?;
    o.opaque_objects("contact")?;
    o.string("reason")?;
    o.string("error")?;
    let topic_url = o.required_string("criteria")?.to_string();
    let filters = criteria_filters(o.extensions_of("criteria")?)?;
    let Some(channel) = o.object("channel")? else {
        return Err(element::required("Subscription.channel"));
    };
    let read = read_channel(channel, status, end, topic_url, filters)?;
    o.finish()?;
    Ok(read)
}

/// `_criteria.extension`: backport-filter-criteria strings (`Encounter?patient=…`).
fn criteria_filters(ext: Option<Obj<'_>>) -> Result<Vec<Filter>, Invalid> {
    let Some(mut ext) = ext else {
        return Ok(Vec::new());
    };
    ext.string("id")?;
    let mut filters = Vec::new();
    for e in ext.extensions("extension")? {
        if e.url.strip_prefix(BACKPORT) != Some("backport-filter-criteria") {
            continue;
        }
        let crit = ext_string(&e, "valueString")?;
        filters.extend(filters_from_criteria(crit, &e.value_path())?);
    }
    ext.finish()?;
    Ok(filters)
}

fn read_channel(
    mut ch: Obj<'_>,
    status: Status,
    end: Option<chrono::DateTime<chrono::Utc>>,
    topic_url: String,
    filters: Vec<Filter>,
) -> Result<Read, Invalid> {
    ch.string("id")?;
    refuse_modifier_extensions(&mut ch)?;
    let (mut heartbeat_period, mut timeout, mut max_count) = (None, None, None);
    for e in ch.extensions("extension")? {
        match e.url.strip_prefix(BACKPORT) {
            Some("backport-heartbeat-period") => {
                heartbeat_period = Some(ext_int(&e, "valueUnsignedInt", 0)?)
            }
            Some("backport-timeout") => timeout = Some(ext_int(&e, "valueUnsignedInt", 0)?),
            Some("backport-max-count") => max_count = Some(ext_int(&e, "valuePositiveInt", 1)?),
            _ => {}
        }
    }
    let typ = ch.required_string("type")?;
    let custom = channel_type_extension(ch.extensions_of("type")?)?;
    let channel = custom.unwrap_or_else(|| typ.to_string());
    let endpoint = ch.string("endpoint")?.map(str::to_string);
    let content_type = ch
        .string("payload")?
        .unwrap_or("application/fhir+json")
        .to_string();
    let content = payload_content(ch.extensions_of("payload")?)?;
    let mut headers = Vec::new();
    for (path, h) in ch.array("header")? {
        let h = check_string(&path, h)?;
        let (name, value) = h.split_once(':').ok_or_else(|| {
            element::value(&path, format!("channel.header {h:?} is not `Name: value`"))
        })?;
        headers.push(header(&path, name.trim(), value.trim())?);
    }
    ch.finish()?;
    Ok(Read {
        status,
        topic_url,
        channel,
        endpoint,
        content,
        content_type,
        headers,
        heartbeat_period,
        timeout,
        max_count,
        end,
        filters,
        signing_secret: None,
        paths: BACKPORT_PATHS,
    })
}

/// `channel._type.extension`: a custom channel type (backport-channel-type, a Coding).
fn channel_type_extension(ext: Option<Obj<'_>>) -> Result<Option<String>, Invalid> {
    let Some(mut ext) = ext else {
        return Ok(None);
    };
    ext.string("id")?;
    let mut code = None;
    for e in ext.extensions("extension")? {
        if e.url.strip_prefix(BACKPORT) == Some("backport-channel-type") {
            let coding = match e.value {
                Some(("valueCoding", v)) => Obj::new(&e.value_path(), v)?,
                _ => {
                    return Err(structure(
                        &e.value_path(),
                        "backport-channel-type needs valueCoding",
                    ))
                }
            };
            code = Some(channel_type(Some(coding))?);
        }
    }
    ext.finish()?;
    Ok(code)
}

/// `channel._payload.extension`: backport-payload-content; absent means empty.
fn payload_content(ext: Option<Obj<'_>>) -> Result<Content, Invalid> {
    let Some(mut ext) = ext else {
        return Ok(Content::Empty);
    };
    ext.string("id")?;
    let mut content = Content::Empty;
    for e in ext.extensions("extension")? {
        if e.url.strip_prefix(BACKPORT) == Some("backport-payload-content") {
            let code = ext_string(&e, "valueCode")?;
            content = Content::parse(code).ok_or_else(|| {
                value(
                    &e.value_path(),
                    format!(
                        "payload content {code:?} is not one of {}",
                        CONTENT.join(", ")
                    ),
                )
            })?;
        }
    }
    ext.finish()?;
    Ok(content)
}

fn ext_string<'a>(e: &Extension<'a>, kind: &str) -> Result<&'a str, Invalid> {
    match e.value {
        Some((k, Value::String(s))) if k == kind => Ok(s),
        _ => Err(structure(
            &e.value_path(),
            format!("extension {} needs {kind}", e.url),
        )),
    }
}

fn ext_int(e: &Extension<'_>, kind: &str, min: i64) -> Result<i32, Invalid> {
    match e.value {
        Some((k, v)) if k == kind => integer(&e.value_path(), v, min),
        _ => Err(structure(
            &e.value_path(),
            format!("extension {} needs {kind}", e.url),
        )),
    }
}

/// `Encounter?patient=Patient/123&status=in-progress` → one filter per parameter.
pub fn filters_from_criteria(crit: &str, path: &str) -> Result<Vec<Filter>, Invalid> {
    let (ty, query) = crit.split_once('?').ok_or_else(|| {
        value(
            path,
            format!("filter criteria {crit:?} is not `Type?param=value`"),
        )
    })?;
    let resource_type = (!ty.is_empty()).then(|| resource_type_of(ty).to_string());
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            if k.is_empty() || v.is_empty() {
                return Err(value(
                    path,
                    format!("filter criteria {crit:?} has an empty parameter or value"),
                ));
            }
            let (parameter, modifier) = match k.split_once(':') {
                Some((p, m)) => (p.to_string(), Some(m.to_string())),
                None => (k.into_owned(), None),
            };
            Ok(Filter {
                resource_type: resource_type.clone(),
                parameter,
                comparator: None,
                modifier,
                value: v.into_owned(),
                source: path.to_string(),
            })
        })
        .collect()
}
