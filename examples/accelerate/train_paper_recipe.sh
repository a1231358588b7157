#!/usr/bin/env bash
# The paper's GRPO stage (arXiv 2605.22658, training) on one node of 8 GPUs:
#   Qwen2.5-VL-7B policy, SAM ViT-H mask decoder, G = 8, reward 0.3 format + 0.7 mask,
#   low-variance KL, mask + confidence loss in the same step, per-module learning rates,
#   vLLM rollouts colocated with training.
# NOT run in this repository (no GPU, no network); every number below is the paper's or
# upstream's, and the paths are placeholders.
#
# What you must change:
#   MODEL_PATH   a SegCompass folder assembled from Qwen2.5-VL-7B-Instruct + facebook/sam-vit-huge
#                (`SegCompassForReasoningSegmentation.from_backbones`), with the SAE pretrained and
#                the supervised warm-up done, saved with save_pretrained (model + processor).
#   VLM_PATH     the Qwen2.5-VL-7B-Instruct folder vLLM loads (the trainer pushes the policy's
#                `vlm.*` weights into it every step; its vocabulary (152064 rows) already has
#                room for <think>, </think> and <REF_POS>).
#   DATA_PATH    a datasets.load_from_disk folder of RefCOCO/+/g + gRefCOCO rows
#                (image, instruction or text, masks), e.g. from data_formats.to_hf_dataset.
#   CONFIG       deepspeed_zero3.yaml (default) or ddp.yaml if the 7B model + reference + SAM
#                fit per GPU; set num_processes there to your GPU count.
#   Batch: per_device_train_batch_size * num_processes * gradient_accumulation_steps must be a
#   multiple of num_generations (here 2 * 8 * 8 = 128 completions = 16 prompts x G = 8,
#   upstream's rollout batch of 16).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-ckpt/segcompass-qwen2.5-vl-7b-sam-vit-h-sft}
VLM_PATH=${VLM_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA_PATH=${DATA_PATH:-data/refcoco_grefcoco_train}
OUTPUT_DIR=${OUTPUT_DIR:-runs/segcompass-grpo}
CONFIG=${CONFIG:-examples/accelerate/deepspeed_zero3.yaml}

accelerate launch --config_file "${CONFIG}" examples/accelerate/train_grpo.py \
  --model_path "${MODEL_PATH}" \
  --dataset_path "${DATA_PATH}" \
  --output_dir "${OUTPUT_DIR}" \
  --num_generations 8 \
  --per_device_train_batch_size 2 \
  --gradient_accumulation_steps 8 \
  --max_completion_length 512 \
  --temperature 1.0 \
  --beta 0.005 \
  --loss_type grpo \
  --learning_rate 1e-6 \
  --module_lr_multipliers '{"codebook": 25, "slot_mapper": 25, "prompt_encoder": 10, "mask_decoder": 5}' \
  --format_reward_weight 0.3 \
  --mask_reward_weight 0.7 \
  --seg_loss_weight 1.0 \
  --conf_loss_weight 0.2 \
  --mask_loss_in_policy_forward true \
  --use_vllm true \
  --vllm_mode colocate \
  --vllm_model_path "${VLM_PATH}" \
  --vllm_gpu_memory_utilization 0.3 \
  --vllm_enable_sleep_mode true \
  --bf16 true \
  --gradient_checkpointing true \
  --num_train_epochs 1 \
  --save_steps 200 \
  --logging_steps 10 \
  --report_to tensorboard
