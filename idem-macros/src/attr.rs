//! The syntax of the `#[idempotent(...)]` options: each `name = value`, its value parsed into
//! the shape that option takes, with its span kept. Rules across options live in `valid.rs`.

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt as _;
use syn::meta::ParseNestedMeta;
use syn::parse::Parse as _;
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitBool, LitStr};

use crate::ctxt::Errors;

/// Every option, in the order the error messages list them.
pub const OPTIONS: &[&str] = &[
    "key",
    "store",
    "scope",
    "ttl",
    "lease",
    "fingerprint",
    "wait",
    "heartbeat",
    "fail_open",
    "strategy",
    "tx",
    "machine",
    "from",
    "to",
    "table",
    "id",
    "column",
    "id_column",
    "version",
    "version_column",
    "set",
    "stale",
    "crate",
];

/// The options as written, each at most once.
#[derive(Default)]
pub struct Options {
    pub key: Option<Key>,
    pub store: Option<Expr>,
    pub scope: Option<LitStr>,
    pub ttl: Option<DurationValue>,
    pub lease: Option<DurationValue>,
    pub fingerprint: Option<FingerprintValue>,
    pub wait: Option<DurationValue>,
    pub heartbeat: Option<LitBool>,
    pub fail_open: Option<LitBool>,
    pub strategy: Option<LitStr>,
    pub tx: Option<Expr>,
    pub machine: Option<syn::Path>,
    pub from: Option<Ident>,
    pub to: Option<Ident>,
    pub table: Option<LitStr>,
    pub id: Option<Expr>,
    pub column: Option<LitStr>,
    pub id_column: Option<LitStr>,
    pub version: Option<Expr>,
    pub version_column: Option<LitStr>,
    pub set: Option<Assignments>,
    pub stale: Option<LitStr>,
    pub krate: Option<syn::Path>,
}

/// `set(column = value, column += value, column -= value, …)` of `strategy = "version"`.
pub struct Assignments {
    /// The `set` keyword, for errors about the whole list.
    pub span: Span,
    pub list: Vec<Assignment>,
}

/// One assignment of `set(…)`.
pub struct Assignment {
    pub column: Ident,
    pub change: Change,
    pub value: Expr,
}

/// How an assignment changes its column.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `column = value`
    Set,
    /// `column += value`: `column = column + value`
    Add,
    /// `column -= value`: `column = column - value`
    Subtract,
}

impl syn::parse::Parse for Assignment {
    fn parse(input: syn::parse::ParseStream<'_>) -> syn::Result<Self> {
        let column: Ident = input.call(syn::ext::IdentExt::parse_any).map_err(|error| {
            syn::Error::new(
                error.span(),
                "`set(…)` lists assignments to columns: `set(status = \"paid\", money -= msg.amount)`",
            )
        })?;
        let lookahead = input.lookahead1();
        let change = if lookahead.peek(syn::Token![+=]) {
            input.parse::<syn::Token![+=]>()?;
            Change::Add
        } else if lookahead.peek(syn::Token![-=]) {
            input.parse::<syn::Token![-=]>()?;
            Change::Subtract
        } else if lookahead.peek(syn::Token![=]) {
            input.parse::<syn::Token![=]>()?;
            Change::Set
        } else {
            return Err(syn::Error::new(
                input.span(),
                format_args!(
                    "expected `=`, `+=` or `-=` after the column `{column}`: `{column} = value` sets it, `{column} += value` and `{column} -= value` change it by the value"
                ),
            ));
        };
        let value = input.parse()?;
        Ok(Self {
            column,
            change,
            value,
        })
    }
}

/// `key = "field.path"` or `key = <expression>`.
pub enum Key {
    /// A dotted path of fields, read from an argument.
    Field(LitStr),
    /// Any expression over the arguments.
    Expr(Expr),
}

/// A duration: a literal such as `"30s"` checked now, or an expression of type `Duration`.
pub enum DurationValue {
    Literal { lit: LitStr, millis: u64 },
    Expr(Expr),
}

/// `fingerprint = false | true | <expression>`.
pub enum FingerprintValue {
    Switch(LitBool),
    Expr(Expr),
}

/// Parses the attribute's arguments, recording every mistake in `errors`.
pub fn parse(args: TokenStream, errors: &mut Errors) -> Options {
    let mut options = Options::default();
    let parser = syn::meta::parser(|meta| option(&mut options, meta, errors));
    if let Err(error) = parser.parse2(args) {
        errors.push(error);
    }
    options
}

fn option(
    options: &mut Options,
    meta: ParseNestedMeta<'_>,
    errors: &mut Errors,
) -> syn::Result<()> {
    let Some(name) = meta.path.get_ident().cloned() else {
        let written = quote::ToTokens::to_token_stream(&meta.path)
            .to_string()
            .replace(' ', "");
        let hint = match meta.path.segments.last() {
            Some(last) if OPTIONS.contains(&last.ident.to_string().as_str()) => {
                format!("write `{}`", last.ident)
            }
            _ => "write one of the names".to_owned(),
        };
        errors.push(syn::Error::new_spanned(
            &meta.path,
            format_args!(
                "`{written}` is not an option: options are plain names ({hint}); expected one of: {}",
                OPTIONS.join(", ")
            ),
        ));
        skip_value(&meta)?;
        return Ok(());
    };
    let label = name.to_string();
    match label.as_str() {
        "key" => {
            let Some(value) = value(&meta, &name, errors)? else {
                return Ok(());
            };
            let key = match value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(lit), ..
                }) => Key::Field(lit),
                other => Key::Expr(other),
            };
            set(&mut options.key, key, &name, errors);
        }
        "store" => {
            let Some(value) = value(&meta, &name, errors)? else {
                return Ok(());
            };
            set(&mut options.store, value, &name, errors);
        }
        "scope" => {
            if let Some(lit) = string(
                &meta,
                &name,
                "a scope such as `scope = \"orders.pay\"`",
                errors,
            )? {
                if lit.value().trim().is_empty() {
                    errors.spanned(
                        lit.span(),
                        "`scope` is empty; name the key space, e.g. `scope = \"orders.pay\"`",
                    );
                }
                set(&mut options.scope, lit, &name, errors);
            }
        }
        "ttl" | "lease" | "wait" => {
            let Some(value) = value(&meta, &name, errors)? else {
                return Ok(());
            };
            if let Some(duration) = duration(value, &name, errors) {
                let slot = match label.as_str() {
                    "ttl" => &mut options.ttl,
                    "lease" => &mut options.lease,
                    _ => &mut options.wait,
                };
                set(slot, duration, &name, errors);
            }
        }
        "fingerprint" => {
            let Some(value) = value(&meta, &name, errors)? else {
                return Ok(());
            };
            let value = match value {
                Expr::Lit(ExprLit {
                    lit: Lit::Bool(switch),
                    ..
                }) => FingerprintValue::Switch(switch),
                other => FingerprintValue::Expr(other),
            };
            set(&mut options.fingerprint, value, &name, errors);
        }
        "heartbeat" | "fail_open" => match value(&meta, &name, errors)? {
            None => {}
            Some(Expr::Lit(ExprLit {
                lit: Lit::Bool(switch),
                ..
            })) => {
                let slot = if label == "heartbeat" {
                    &mut options.heartbeat
                } else {
                    &mut options.fail_open
                };
                set(slot, switch, &name, errors);
            }
            Some(other) => errors.spanned(
                other.span(),
                format_args!("`{label}` takes `true` or `false`, e.g. `{label} = true`"),
            ),
        },
        "strategy" => {
            if let Some(lit) = string(&meta, &name, "`strategy = \"claim\"`", errors)? {
                set(&mut options.strategy, lit, &name, errors);
            }
        }
        "tx" => {
            if let Some(value) = value(&meta, &name, errors)? {
                set(&mut options.tx, value, &name, errors);
            }
        }
        "machine" => {
            if let Some(value) = value(&meta, &name, errors)? {
                match value {
                    Expr::Path(path) if path.qself.is_none() => {
                        set(&mut options.machine, path.path, &name, errors);
                    }
                    other => errors.spanned(
                        other.span(),
                        "`machine` names the enum that derives `StateMachine`, e.g. `machine = OrderStatus`",
                    ),
                }
            }
        }
        "from" | "to" => {
            if let Some(value) = value(&meta, &name, errors)? {
                let state = match &value {
                    Expr::Path(path) if path.qself.is_none() => path.path.get_ident().cloned(),
                    _ => None,
                };
                match state {
                    Some(state) => {
                        let slot = if label == "from" {
                            &mut options.from
                        } else {
                            &mut options.to
                        };
                        set(slot, state, &name, errors);
                    }
                    None => errors.spanned(
                        value.span(),
                        format_args!(
                            "`{label}` names a state of the machine, e.g. `{label} = Paid`"
                        ),
                    ),
                }
            }
        }
        "table" | "column" | "id_column" | "version_column" => {
            let example = format!("a plain SQL identifier, e.g. `{label} = \"orders\"`");
            if let Some(lit) = string(&meta, &name, &example, errors)? {
                if let Err(reason) = plain_identifier(&lit.value()) {
                    errors.spanned(
                        lit.span(),
                        format_args!("`{label} = {:?}` is not a plain SQL identifier: {reason}; names are never quoted, so use ASCII letters, digits and `_`", lit.value()),
                    );
                }
                let slot = match label.as_str() {
                    "table" => &mut options.table,
                    "column" => &mut options.column,
                    "version_column" => &mut options.version_column,
                    _ => &mut options.id_column,
                };
                set(slot, lit, &name, errors);
            }
        }
        "id" => {
            if let Some(value) = value(&meta, &name, errors)? {
                set(&mut options.id, value, &name, errors);
            }
        }
        "version" => {
            if let Some(value) = value(&meta, &name, errors)? {
                set(&mut options.version, value, &name, errors);
            }
        }
        "stale" => {
            if let Some(lit) = string(
                &meta,
                &name,
                "`stale = \"duplicate\"` or `stale = \"conflict\"`",
                errors,
            )? {
                if !matches!(lit.value().as_str(), "duplicate" | "conflict") {
                    errors.spanned(
                        lit.span(),
                        format_args!("`stale = {:?}` is not a choice: a row past the expected version is either `\"duplicate\"` (the change was applied already: the default) or `\"conflict\"` (someone else changed the row)", lit.value()),
                    );
                }
                set(&mut options.stale, lit, &name, errors);
            }
        }
        "set" => {
            if !meta.input.peek(syn::token::Paren) {
                errors.spanned(
                    name.span(),
                    "`set` takes a list of assignments in parentheses: `set(status = \"paid\", money -= msg.amount)`",
                );
                skip_value(&meta)?;
                return Ok(());
            }
            let content;
            syn::parenthesized!(content in meta.input);
            // A malformed list is reported, and the options after it are still read.
            let (list, malformed) =
                match content.parse_terminated(Assignment::parse, syn::Token![,]) {
                    Ok(list) => (list.into_iter().collect::<Vec<_>>(), false),
                    Err(error) => {
                        errors.push(error);
                        // The rest of the list is skipped: one error for it is enough.
                        content.parse::<TokenStream>()?;
                        (Vec::new(), true)
                    }
                };
            if list.is_empty() && !malformed {
                errors.spanned(
                    name.span(),
                    "`set()` is empty: list the columns the update assigns, e.g. `set(status = \"paid\")`",
                );
            }
            for (n, assignment) in list.iter().enumerate() {
                let column = assignment.column.unraw().to_string();
                if let Err(reason) = plain_identifier(&column) {
                    errors.spanned(
                        assignment.column.span(),
                        format_args!("column `{column}` is not a plain SQL identifier: {reason}"),
                    );
                }
                if list[..n]
                    .iter()
                    .any(|earlier| earlier.column.unraw() == assignment.column.unraw())
                {
                    errors.spanned(
                        assignment.column.span(),
                        format_args!("column `{column}` is assigned twice in `set(…)`: one assignment per column"),
                    );
                }
            }
            set(
                &mut options.set,
                Assignments {
                    span: name.span(),
                    list,
                },
                &name,
                errors,
            );
        }
        "crate" => {
            if let Some(lit) = string(
                &meta,
                &name,
                "the path idem is re-exported at, e.g. `crate = \"my_crate::idem\"`",
                errors,
            )? {
                match lit.parse::<syn::Path>() {
                    Ok(path) => set(&mut options.krate, path, &name, errors),
                    Err(_) => errors.spanned(
                        lit.span(),
                        "`crate` must be a path such as `crate = \"my_crate::idem\"`",
                    ),
                }
            }
        }
        _ => {
            let options = OPTIONS.join(", ");
            let message = match closest(&label) {
                Some(closest) => format!(
                    "unknown option `{label}`; did you mean `{closest}`? Expected one of: {options}"
                ),
                None => format!("unknown option `{label}`; expected one of: {options}"),
            };
            errors.spanned(name.span(), message);
            skip_value(&meta)?;
        }
    }
    Ok(())
}

/// Stores an option's value, or reports the option as given twice.
fn set<T>(slot: &mut Option<T>, value: T, name: &Ident, errors: &mut Errors) {
    if slot.is_some() {
        errors.spanned(
            name.span(),
            format_args!("duplicate option `{name}`; give each option once"),
        );
    } else {
        *slot = Some(value);
    }
}

/// The option's value, or `None` (with the error recorded) when it has none.
fn value(
    meta: &ParseNestedMeta<'_>,
    name: &Ident,
    errors: &mut Errors,
) -> syn::Result<Option<Expr>> {
    if meta.input.peek(syn::Token![=]) {
        return meta.value()?.parse().map(Some);
    }
    let error = syn::Error::new(
        name.span(),
        format_args!("option `{name}` needs a value: `{name} = …`"),
    );
    if meta.input.is_empty() || meta.input.peek(syn::Token![,]) {
        errors.push(error);
        Ok(None)
    } else {
        Err(error)
    }
}

fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        meta.value()?.parse::<Expr>()?;
    }
    Ok(())
}

fn string(
    meta: &ParseNestedMeta<'_>,
    name: &Ident,
    example: &str,
    errors: &mut Errors,
) -> syn::Result<Option<LitStr>> {
    match value(meta, name, errors)? {
        None => Ok(None),
        Some(Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        })) => Ok(Some(lit)),
        Some(other) => {
            errors.spanned(
                other.span(),
                format_args!("`{name}` takes a string literal: {example}"),
            );
            Ok(None)
        }
    }
}

fn duration(value: Expr, name: &Ident, errors: &mut Errors) -> Option<DurationValue> {
    let example = format!("`{name} = \"30s\"` (units: ms, s, m, h, d)");
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => {
            let parsed = match humantime::parse_duration(lit.value().trim()) {
                Ok(parsed) => parsed,
                Err(error) => {
                    errors.spanned(
                        lit.span(),
                        format_args!(
                            "invalid duration {:?} for `{name}`: {error}; write e.g. {example}",
                            lit.value()
                        ),
                    );
                    return None;
                }
            };
            let Ok(millis) = u64::try_from(parsed.as_millis()) else {
                errors.spanned(lit.span(), format_args!("`{name}` is too long"));
                return None;
            };
            if millis == 0 {
                errors.spanned(
                    lit.span(),
                    format_args!("`{name}` must be at least one millisecond; write e.g. {example}"),
                );
                return None;
            }
            Some(DurationValue::Literal { lit, millis })
        }
        Expr::Lit(other) => {
            errors.spanned(
                other.span(),
                format_args!("`{name}` takes a duration string with a unit, e.g. {example}, or an expression of type `std::time::Duration`"),
            );
            None
        }
        expr => Some(DurationValue::Expr(expr)),
    }
}

/// The option closest to a misspelt one, if any is close enough to be a likely typo.
fn closest(unknown: &str) -> Option<&'static str> {
    OPTIONS
        .iter()
        .map(|option| (strsim::damerau_levenshtein(unknown, option), *option))
        .filter(|(distance, option)| *distance <= 2 && *distance < option.len() / 2 + 1)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, option)| option)
}

/// Whether `name` is a plain SQL identifier: an ASCII letter or `_`, then letters, digits or
/// `_`, at most 63 bytes (the rule the runtime applies to table names too).
fn plain_identifier(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("it is empty"),
        Some(first) if !(first.is_ascii_alphabetic() || first == '_') => {
            return Err("it must start with an ASCII letter or `_`");
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("it may only contain ASCII letters, digits and `_`");
    }
    if name.len() > 63 {
        return Err("it is longer than 63 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn messages(args: TokenStream) -> Vec<String> {
        let mut errors = Errors::default();
        parse(args, &mut errors);
        errors.messages()
    }

    #[test]
    fn suggests_the_closest_option() {
        assert_eq!(closest("tll"), Some("ttl"));
        assert_eq!(closest("stor"), Some("store"));
        assert_eq!(closest("fingerprnt"), Some("fingerprint"));
        assert_eq!(closest("zzz"), None);
    }

    #[test]
    fn reports_every_mistake_at_once() {
        let found = messages(quote!(
            tll = "1h",
            key = "a",
            key = "b",
            lease = "soon",
            scope = 3
        ));
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].starts_with("unknown option `tll`; did you mean `ttl`?"));
        assert!(found[1].starts_with("duplicate option `key`"));
        assert!(found[2].starts_with("invalid duration \"soon\" for `lease`"));
        assert!(found[3].starts_with("`scope` takes a string literal"));
    }

    #[test]
    fn parses_durations_and_expressions() {
        let mut errors = Errors::default();
        let options = parse(
            quote!(
                key = msg.id,
                store = &self.store,
                ttl = "1h 30m",
                lease = LEASE,
                fingerprint = false
            ),
            &mut errors,
        );
        assert!(errors.is_empty());
        assert!(matches!(options.key, Some(Key::Expr(_))));
        assert!(matches!(
            options.ttl,
            Some(DurationValue::Literal {
                millis: 5_400_000,
                ..
            })
        ));
        assert!(matches!(options.lease, Some(DurationValue::Expr(_))));
        assert!(matches!(options.fingerprint, Some(FingerprintValue::Switch(ref b)) if !b.value));
    }
}
