"""The handle's features, one module each: a named :class:`~fastattn.features.part.Part` that the
handle (:mod:`fastattn.hooks`) puts in its registry in order and takes out in reverse, so that
removing fastattn undoes exactly what was installed.

=================  ============================================================================
``branches``       each processor's caches parked and restored per CFG branch (:mod:`.branches`)
``processors``     the family's processors on the attention layers; each call told to its state
``block_caches``   block caches (diffusers', cache-dit's) looked for at each generation (:mod:`.block_caches`)
``step_counting``  the forward pre-hook and instance ``forward`` that count calls (:mod:`.steps`)
``scheduler``      ``set_timesteps`` wrapped: each generation's start (:mod:`.scheduler`)
``compile``        dynamo's recompile limit raised to what a plan needs (:mod:`.compile`)
``cache_store``    FP8 / host caches released per generation, host reads fetched ahead
``cuda_graphs``    each step layout replayed from a CUDA graph (added by ``enable_cuda_graphs``)
=================  ============================================================================

A part asks the family what it supports (:attr:`fastattn.family.FamilyState.supports`) instead
of looking for attributes; :mod:`.offloading` holds what the parts ask about diffusers' offloading.
"""
