"""Interpretability: why this mask, and does it depend on the concepts the trace names.

arXiv 2605.22658 describes a white-box path from reasoning to mask: SAE concepts fire on
visual and chain-of-thought tokens, each slot gathers some of them through the query
codebook, the slot points on the image (its heatmap) and SAM turns that into a mask. The
paper gives no causal evidence for it; these modules trace the path and test it:

* `explain`: per image and slot, the top concepts with their tokens, the heatmap, the mask
  and the confidence (`explain.explain`, `explain.build_explanation_inputs`).
* `ablation`: remove or swap concepts with everything else frozen and measure how the masks
  move (`ablate_concepts`, `rank_concepts_by_effect`, `mask_prompt_dependence`,
  `concept_ablation_study`); `edits` holds the editing and the measures of change.
* `attribution`: how much of a slot's mask each (token, concept) pair carries (integrated
  gradients or one-at-a-time removal) and deletion curves that check it
  (`attribute_pairs`, `occlusion_effects`, `deletion_curves`).
* `faithfulness`: those curves and the purity of the named concepts per query family
  (`faithfulness_study`).
* `quality`: per-sample concept quality against mask IoU, with correlations
  (`concept_quality_vs_accuracy`, `correlate`).
* `render`: PNG figures and a static HTML report (`render_explanation`, `render_ablation`,
  `plot_quality_vs_accuracy`, `write_report`); matplotlib is imported only there.
* `labels`: names the concepts from the tokens that activate them, stored with the model,
  and in the attribute words of a world (`concepts_in_words`).
* `trace`: the frozen forward and per-slot concept weights the others share.
"""
