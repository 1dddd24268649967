//! `#[derive(StateMachine)]`: the states of a fieldless enum, their declared transitions and
//! what each state reaches, all known at compile time.

use proc_macro2::TokenStream;
use quote::quote;
use syn::ext::IdentExt as _;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, LitStr};

use crate::ctxt::Errors;

/// The expansion of the derive, or its errors.
pub fn derive(input: TokenStream) -> TokenStream {
    let input = match syn::parse2::<DeriveInput>(input) {
        Ok(input) => input,
        Err(error) => return error.to_compile_error(),
    };
    let mut errors = Errors::default();
    let expanded = expand(&input, &mut errors);
    match (errors.is_empty(), expanded) {
        (true, Some(expanded)) => expanded,
        _ => {
            let errors = errors.to_compile_errors();
            let fallback = fallback(&input);
            quote!(#errors #fallback)
        }
    }
}

/// What a failed derive emits besides its errors (thiserror's `fallback.rs`): a stand-in impl,
/// so that handlers naming the machine and code calling its methods get no errors of their
/// own — the derive's are the ones to fix. It declares every transition and panics if called;
/// it never runs, since the crate does not compile. None for a generic type, whose bounds the
/// stand-in could not know.
fn fallback(input: &DeriveInput) -> TokenStream {
    if !input.generics.params.is_empty() {
        return TokenStream::new();
    }
    let name = &input.ident;
    let krate = input
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("state"))
        .find_map(|attr| {
            let mut krate = None;
            let _ = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("crate") {
                    let lit: LitStr = meta.value()?.parse()?;
                    krate = lit.parse::<syn::Path>().ok();
                } else if meta.input.peek(syn::Token![=]) {
                    let _: syn::Expr = meta.value()?.parse()?;
                }
                Ok(())
            });
            krate
        })
        .unwrap_or_else(|| syn::parse_quote!(::idem_runtime));
    let failed = "`#[derive(StateMachine)]` failed: see its errors";
    quote! {
        impl #name {
            #[doc(hidden)]
            pub const fn __idem_declared(from: Self, to: Self) -> bool {
                let _ = (from, to);
                true
            }
        }

        impl #krate::state::StateMachine for #name {
            const STORAGE: #krate::state::Storage = #krate::state::Storage::Text;

            fn name(self) -> &'static str {
                ::core::unreachable!(#failed)
            }

            fn from_text(_: &str) -> ::core::option::Option<Self> {
                ::core::unreachable!(#failed)
            }

            fn to_int(self) -> i64 {
                ::core::unreachable!(#failed)
            }

            fn from_int(_: i64) -> ::core::option::Option<Self> {
                ::core::unreachable!(#failed)
            }

            fn reaches(self, _: Self) -> bool {
                ::core::unreachable!(#failed)
            }
        }
    }
}

fn expand(input: &DeriveInput, errors: &mut Errors) -> Option<TokenStream> {
    let name = &input.ident;
    let Data::Enum(data) = &input.data else {
        errors.spanned(
            name.span(),
            "`StateMachine` is derived on an enum of states, e.g. `enum OrderStatus { Created, Paid }`",
        );
        return None;
    };
    if !input.generics.params.is_empty() {
        errors.spanned(
            input.generics.span(),
            "a `StateMachine` enum cannot be generic",
        );
    }
    let mut int_storage = false;
    let mut krate: syn::Path = syn::parse_quote!(::idem_runtime);
    for attr in input
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("state"))
    {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("storage") {
                let lit: LitStr = meta.value()?.parse()?;
                match lit.value().as_str() {
                    "text" => int_storage = false,
                    "int" => int_storage = true,
                    other => errors.spanned(
                        lit.span(),
                        format_args!("unknown storage `{other}`: write `storage = \"text\"` (the state's name, the default) or `storage = \"int\"` (its discriminant)"),
                    ),
                }
                Ok(())
            } else if meta.path.is_ident("crate") {
                let lit: LitStr = meta.value()?.parse()?;
                krate = lit.parse()?;
                Ok(())
            } else {
                Err(meta.error("unknown `state` option on the enum: expected `storage = \"text\"` or `storage = \"int\"`"))
            }
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }

    let states: Vec<&Ident> = data.variants.iter().map(|variant| &variant.ident).collect();
    if states.is_empty() {
        errors.spanned(name.span(), "a `StateMachine` needs at least one state");
    }
    let mut edges: Vec<(usize, usize)> = Vec::new();
    for (from, variant) in data.variants.iter().enumerate() {
        if !matches!(variant.fields, Fields::Unit) {
            errors.spanned(
                variant.fields.span(),
                format_args!(
                    "state `{}` has fields: the states of a `StateMachine` are plain names",
                    variant.ident
                ),
            );
        }
        for attr in variant
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("state"))
        {
            let parsed = attr.parse_nested_meta(|meta| {
                if !meta.path.is_ident("to") {
                    return Err(meta.error("unknown `state` option on a state: expected `to(…)`, e.g. `#[state(to(Paid, Cancelled))]`"));
                }
                meta.parse_nested_meta(|target| {
                    let Some(ident) = target.path.get_ident() else {
                        return Err(target.error("name a state of this enum, e.g. `to(Paid)`"));
                    };
                    match states.iter().position(|state| *state == ident) {
                        Some(to) if to == from => errors.spanned(
                            ident.span(),
                            format_args!("`{ident}` cannot go to itself: a guarded transition could not tell a redelivery from a new message"),
                        ),
                        Some(to) => edges.push((from, to)),
                        None => errors.spanned(
                            ident.span(),
                            format_args!(
                                "`{ident}` is not a state of `{name}`; its states are: {}",
                                states.iter().map(|state| state.unraw().to_string()).collect::<Vec<_>>().join(", ")
                            ),
                        ),
                    }
                    Ok(())
                })
            });
            if let Err(error) = parsed {
                errors.push(error);
            }
        }
    }
    if !errors.is_empty() {
        return None;
    }

    // What each state reaches in zero or more declared transitions (Warshall's closure).
    let n = states.len();
    let mut reaches = vec![vec![false; n]; n];
    for (i, row) in reaches.iter_mut().enumerate() {
        row[i] = true;
    }
    for &(from, to) in &edges {
        reaches[from][to] = true;
    }
    for k in 0..n {
        let through = reaches[k].clone();
        for row in &mut reaches {
            if row[k] {
                for (reached, via) in row.iter_mut().zip(&through) {
                    *reached |= *via;
                }
            }
        }
    }
    let reach_arms = reaches.iter().enumerate().flat_map(|(i, row)| {
        let states = &states;
        row.iter()
            .enumerate()
            .filter(|(_, reached)| **reached)
            .map(move |(j, _)| {
                let (a, b) = (states[i], states[j]);
                quote!((#name::#a, #name::#b))
            })
    });

    let storage = if int_storage {
        quote!(#krate::state::Storage::Int)
    } else {
        quote!(#krate::state::Storage::Text)
    };
    let declared = if edges.is_empty() {
        quote!({
            let _ = (from, to);
            false
        })
    } else {
        let pairs = edges.iter().map(|&(from, to)| {
            let (from, to) = (states[from], states[to]);
            quote!((#name::#from, #name::#to))
        });
        quote!(::core::matches!((from, to), #(#pairs)|*))
    };
    let names: Vec<String> = states
        .iter()
        .map(|state| state.unraw().to_string())
        .collect();
    // Integer storage keeps discriminants in a BIGINT: each must fit.
    let fits = states.iter().map(|state| {
        let message = format!(
            "the discriminant of `{}` does not fit in an i64, which `storage = \"int\"` stores",
            state.unraw()
        );
        quote!(::core::assert!(
            #name::#state as i128 >= i64::MIN as i128 && #name::#state as i128 <= i64::MAX as i128,
            #message
        );)
    });
    let fits = if int_storage {
        quote!(const _: () = { #(#fits)* };)
    } else {
        quote!()
    };
    let text_arms = states
        .iter()
        .zip(&names)
        .map(|(state, text)| quote!(#text => ::core::option::Option::Some(#name::#state)));
    let name_arms = states
        .iter()
        .zip(&names)
        .map(|(state, text)| quote!(#name::#state => #text));
    let int_arms = states.iter().map(|state| {
        quote!(value if value == #name::#state as i64 => ::core::option::Option::Some(#name::#state))
    });

    Some(quote! {
        #fits

        impl #name {
            /// Whether the machine declares `from → to`: what `#[idempotent(strategy =
            /// "state")]` checks at compile time.
            #[doc(hidden)]
            pub const fn __idem_declared(from: Self, to: Self) -> bool {
                #declared
            }
        }

        impl #krate::state::StateMachine for #name {
            const STORAGE: #krate::state::Storage = #storage;

            fn name(self) -> &'static str {
                match self {
                    #(#name_arms,)*
                }
            }

            fn from_text(name: &str) -> ::core::option::Option<Self> {
                match name {
                    #(#text_arms,)*
                    _ => ::core::option::Option::None,
                }
            }

            #[allow(clippy::cast_lossless, clippy::as_conversions)]
            fn to_int(self) -> i64 {
                self as i64
            }

            #[allow(clippy::cast_lossless, clippy::as_conversions)]
            fn from_int(value: i64) -> ::core::option::Option<Self> {
                match value {
                    #(#int_arms,)*
                    _ => ::core::option::Option::None,
                }
            }

            fn reaches(self, other: Self) -> bool {
                ::core::matches!((self, other), #(#reach_arms)|*)
            }
        }
    })
}
