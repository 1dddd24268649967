//! The handler as the macro sees it: the function as written and its arguments by name.

use proc_macro2::{Span, TokenStream};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, Item, ItemFn, Pat};

/// An annotated function, kept as written.
pub struct Handler {
    pub item: ItemFn,
    /// The arguments after the receiver, by name (`None` for a destructuring pattern).
    pub args: Vec<Arg>,
    /// Whether the function takes `self`.
    pub has_receiver: bool,
}

/// One argument of the handler.
pub struct Arg {
    pub name: Option<Ident>,
    pub span: Span,
}

/// The error for an item that is not a function with a body, at the token that shows it.
fn not_a_function(item: TokenStream) -> syn::Error {
    let declaration = syn::parse2::<syn::TraitItemFn>(item.clone())
        .ok()
        .and_then(|item| item.semi_token)
        .or_else(|| {
            syn::parse2::<syn::ForeignItemFn>(item.clone())
                .ok()
                .map(|item| item.semi_token)
        });
    if let Some(semi) = declaration {
        return syn::Error::new(
            semi.span,
            "`#[idempotent]` needs a function with a body: put it on the method in the `impl` \
             block, not on the trait's declaration",
        );
    }
    let (kind, span) = match syn::parse2::<Item>(item) {
        Ok(Item::Struct(item)) => ("a struct", item.struct_token.span),
        Ok(Item::Enum(item)) => ("an enum", item.enum_token.span),
        Ok(Item::Union(item)) => ("a union", item.union_token.span),
        Ok(Item::Trait(item)) => ("a trait", item.trait_token.span),
        Ok(Item::Impl(item)) => ("an `impl` block", item.impl_token.span),
        Ok(Item::Mod(item)) => ("a module", item.mod_token.span),
        Ok(Item::Const(item)) => ("a const", item.const_token.span),
        Ok(Item::Static(item)) => ("a static", item.static_token.span),
        Ok(Item::Type(item)) => ("a type alias", item.type_token.span),
        Ok(Item::Use(item)) => ("a `use`", item.use_token.span),
        _ => ("this item", Span::call_site()),
    };
    syn::Error::new(
        span,
        format_args!(
            "`#[idempotent]` applies to an `async fn` handler, not to {kind}: put it on the \
             `async fn` that handles the message"
        ),
    )
}

impl Handler {
    /// Parses the annotated item; anything but a function with a body is an error.
    pub fn parse(item: TokenStream) -> syn::Result<Self> {
        let item: ItemFn = syn::parse2(item.clone()).map_err(|_| not_a_function(item))?;
        let mut has_receiver = false;
        let mut args = Vec::new();
        for input in &item.sig.inputs {
            match input {
                FnArg::Receiver(_) => has_receiver = true,
                FnArg::Typed(typed) => args.push(Arg {
                    name: match &*typed.pat {
                        Pat::Ident(pat) if pat.subpat.is_none() => Some(pat.ident.clone()),
                        _ => None,
                    },
                    span: typed.pat.span(),
                }),
            }
        }
        Ok(Self {
            item,
            args,
            has_receiver,
        })
    }

    /// The argument called `name`, if there is one.
    pub fn arg(&self, name: &str) -> Option<&Ident> {
        self.args
            .iter()
            .filter_map(|arg| arg.name.as_ref())
            .find(|ident| *ident == name)
    }
}
