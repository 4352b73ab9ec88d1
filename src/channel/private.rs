//! The private-address rule: loopback, private, link-local, CGNAT, unspecified, broadcast
//! and multicast addresses are not sent to unless `[delivery] allow_private_endpoints` says
//! so. Subscription checks apply it to literal hosts when a subscription is created (through
//! `fhir::subscription::Rules`); rest-hook applies it at send time to the addresses each
//! connection actually uses.

use std::net::IpAddr;

/// Why a send is refused: the host resolves to no public address.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to loopback, private or link-local addresses (delivery.allow_private_endpoints is false)")]
pub(crate) struct PrivateAddress(pub(crate) String);

/// The rule for `Rules::refuse_private`: `None` when private endpoints are allowed.
pub fn rule(allow_private: bool) -> Option<fn(&url::Url) -> bool> {
    (!allow_private).then_some(is_private_host as fn(&url::Url) -> bool)
}

/// A host that is `localhost`, a private address literal, or missing.
pub(crate) fn is_private_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => is_private_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_private_ip(IpAddr::V6(ip)),
        None => true,
    }
}

/// Loopback, private, link-local, unspecified, broadcast or multicast: addresses a
/// notification must not reach unless private endpoints are allowed. IPv4-mapped and
/// IPv4-compatible IPv6 addresses are judged as the IPv4 address they carry.
pub(crate) fn is_private_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                // 100.64.0.0/10, carrier-grade NAT: inside someone's network.
                || (v.octets()[0] == 100 && (v.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v) => {
            if let Some(v4) = v.to_ipv4() {
                if !v.is_loopback() && !v.is_unspecified() {
                    return is_private_ip(IpAddr::V4(v4));
                }
            }
            let first = v.segments()[0];
            v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}
