//! The WGSL of every stage and what naga's reflection reads from it: the storage buffers
//! each kernel binds, at the numbers and with the access its WGSL declares. Nothing here
//! lists a binding by hand; the kernel table ([`KERNELS`]) names only entry points.

use crate::error::{Error, Result};
use crate::gpu::kernels::KERNELS;
use crate::gpu::resources::Resource;
use ssdkd_core::Stage;
use std::sync::OnceLock;
use wgpu::naga;

/// A stage's WGSL: the shared include, any further includes, then the stage's own file.
macro_rules! stage_source {
    ($($file:literal),+) => {
        concat!(
            include_str!("../../../shaders/shared.wgsl"),
            $(include_str!(concat!("../../../shaders/", $file))),+
        )
    };
}

/// The WGSL of a stage (`shaders/<stage>.wgsl` after `shaders/shared.wgsl`, and after
/// `shaders/logits.wgsl` for the stages that read the logits, validate included).
pub(crate) fn stage_source(stage: Stage) -> &'static str {
    match stage {
        Stage::Validate => stage_source!("logits.wgsl", "validate.wgsl"),
        Stage::Match => stage_source!("match.wgsl"),
        Stage::PriorTerms => stage_source!("logits.wgsl", "prior_terms.wgsl"),
        Stage::Mine => stage_source!("mine.wgsl"),
        Stage::Reduce => stage_source!("logits.wgsl", "reduce.wgsl"),
        Stage::Grad => stage_source!("logits.wgsl", "grad.wgsl"),
    }
}

/// A storage buffer a kernel binds, as its WGSL declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Binding {
    /// The buffer, by the variable's name.
    pub resource: Resource,
    /// Its `@binding(n)` in `@group(0)` (0 is the `Params` uniform).
    pub binding: u32,
    /// Declared `read_write`.
    pub writes: bool,
}

/// A stage's module, parsed and validated.
pub(crate) fn module(stage: Stage) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let source = stage_source(stage);
    let fail = |what: String| Error::Gpu(format!("{}.wgsl: {what}", stage.name()));
    let module =
        naga::front::wgsl::parse_str(source).map_err(|e| fail(e.emit_to_string(source)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .map_err(|e| fail(e.emit_to_string(source)))?;
    Ok((module, info))
}

/// The storage buffers `entry_point` of `stage` uses (directly or through the functions
/// it calls), in binding order.
fn reflect(stage: Stage, entry_point: &str) -> Result<Vec<Binding>> {
    let (module, info) = module(stage)?;
    let fail = |what: String| Error::Gpu(format!("{}.wgsl {entry_point}: {what}", stage.name()));
    let index = module
        .entry_points
        .iter()
        .position(|e| e.name == entry_point)
        .ok_or_else(|| fail("no such entry point".into()))?;
    let uses = info.get_entry_point(index);
    let mut bindings = Vec::new();
    for (handle, global) in module.global_variables.iter() {
        let (Some(bound), Some(name)) = (&global.binding, &global.name) else {
            continue;
        };
        if uses[handle].is_empty() {
            continue;
        }
        if bound.group != 0 {
            return Err(fail(format!("{name} is in group {}, not 0", bound.group)));
        }
        if bound.binding == 0 {
            if name != "params" {
                return Err(fail(format!("binding 0 is {name}, not the params uniform")));
            }
            continue;
        }
        let resource = Resource::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| fail(format!("{name} is no buffer of the host's")))?;
        let naga::AddressSpace::Storage { access } = global.space else {
            return Err(fail(format!("{name} is not a storage buffer")));
        };
        bindings.push(Binding {
            resource,
            binding: bound.binding,
            writes: access.contains(naga::StorageAccess::STORE),
        });
    }
    bindings.sort_by_key(|b| b.binding);
    Ok(bindings)
}

/// Every kernel's bindings, in [`KERNELS`] order, reflected once per process.
///
/// # Errors
/// [`Error::Gpu`] when a shader does not parse or validate, or declares a buffer the host
/// does not know (a build defect: the tests parse every shader).
pub(crate) fn kernel_bindings() -> Result<&'static [Vec<Binding>]> {
    static REFLECTED: OnceLock<std::result::Result<Vec<Vec<Binding>>, String>> = OnceLock::new();
    REFLECTED
        .get_or_init(|| {
            KERNELS
                .iter()
                .map(|k| reflect(k.stage, k.entry_point))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| Error::Gpu(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage's WGSL parses and validates, and every kernel's bindings reflect.
    #[test]
    fn every_stage_compiles_and_reflects() {
        for stage in Stage::ALL {
            module(stage).unwrap_or_else(|e| panic!("{e}"));
        }
        let bindings = kernel_bindings().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bindings.len(), KERNELS.len());
    }

    /// The reflection follows calls and reads the declared access: `prior_terms` reads the
    /// logits through `logits.wgsl`'s helpers and writes what it declares `read_write`;
    /// the match kernels, which include no `logits.wgsl`, bind no logits; `reduce_batch`
    /// binds only the sums.
    #[test]
    fn bindings_come_from_the_functions_an_entry_point_calls() {
        let of = |entry: &str| {
            kernel_bindings().unwrap()[crate::gpu::kernels::index_of(entry).unwrap()].clone()
        };
        let prior_terms = of("prior_terms");
        let find =
            |bindings: &[Binding], r: Resource| bindings.iter().find(|b| b.resource == r).copied();
        assert_eq!(
            find(&prior_terms, Resource::StudentConf).map(|b| b.writes),
            Some(false)
        );
        assert_eq!(
            find(&prior_terms, Resource::MiningScore).map(|b| b.writes),
            Some(true)
        );
        for entry in ["match_priors", "match_objects", "match_finish"] {
            let bound = of(entry);
            assert_eq!(find(&bound, Resource::StudentConf), None, "{entry}");
            assert!(
                find(&bound, Resource::ConfTarget).is_some_and(|b| b.writes),
                "{entry}"
            );
        }
        let reduce_batch: Vec<Resource> = of("reduce_batch").iter().map(|b| b.resource).collect();
        assert_eq!(reduce_batch, [Resource::ImageSums, Resource::BatchSums]);
    }
}
