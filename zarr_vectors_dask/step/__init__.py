"""Graph stages of one coarsening step, one function per stage.

Each runs inside a Dask task: it gets a small picklable ``StepSpec``, its
own slice of the work and the outputs of the tasks it depends on; it reads
or writes the store itself and returns only what later stages need.

    context_refs ...   (strategies other than "random") per-object lengths and
      object_points    points, before the survivors are picked: see stage 0b
    object_table       the id table and the survivors of sparsity
    object_refs        per manifest bucket: which fragments kept objects name
    bin_partials       per source block: bin keys, partial centroid sums
                       (and per-vertex attribute partials, when asked)
    reduce_metavertices per partition: sum partials into metavertices
    write_metavertices per target block: order, encode, write vertex cells
                       (and the metavertices' attribute cells)
    resolve_parents    per partition: bin key -> (chunk, fragment) answers
    links_and_sequences per source block: +1 link cells and their -1 mirrors,
                       per-fragment metavertex sequences for manifests
    write_manifests    per bucket: object_index rows of the coarse level
    write_attributes   per attribute bucket: masked object attributes
    write_shards       (sharded) per run of shards: the cells the writers
                       above sent there, encoded into whole shards

Exchanges between stages are dicts keyed by destination; the executor
routes only non-empty (source, destination) pairs.
"""
