// Image prompts' preprocessing (runtime/images.py): PNG/JPEG decoded to RGB, resized exactly as Pillow's
// Image.resize (ImagingResample: separable antialiased convolution, 22-bit fixed-point coefficients, a
// horizontal then a vertical pass each rounding and clipping to uint8), then rescaled and normalised.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.h"

namespace gemma {

struct RgbImage {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // height x width x 3
};

bool image_support();  // built with libpng and libjpeg
// Throws "--image PATH: no such file" / "--image PATH: not a readable image (...)" (Python's messages).
RgbImage load_image(const std::string& path);
// Pillow's resize of an RGB image; `resample`: bilinear, bicubic, lanczos, box, hamming.
RgbImage resize(const RgbImage& image, int64_t width, int64_t height, const std::string& resample);
// [3, height, width] float32: resize, rescale (double product, then float32), normalise in float32.
std::vector<float> pixel_values(const RgbImage& image, const ImagePreprocessing& pre, RgbImage* resized = nullptr);

}  // namespace gemma
