// The input image and the inpainting mask painted over it: the mask is a canvas at the image's own size, painted
// where the picture is to change; it is sent as a black and white PNG (white = repaint, black = keep).

export class ImageInput {
  constructor(box, source, mask, { onChange = () => {} } = {}) {
    Object.assign(this, { box, source, mask, onChange });
    this.blob = null; // the image as chosen (sent as it is)
    this.tool = "brush";
    this.size = 16;
    this.last = null;
    mask.addEventListener("pointerdown", (e) => this.down(e));
    mask.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) mask.addEventListener(name, () => { this.last = null; });
  }

  get width() { return this.source.width; }
  get height() { return this.source.height; }

  // Show an image (a Blob or File); its mask starts empty unless `maskBlob` is given.
  async set(blob, maskBlob = null) {
    const bitmap = await createImageBitmap(blob);
    this.blob = blob;
    for (const canvas of [this.source, this.mask]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    this.source.getContext("2d").drawImage(bitmap, 0, 0);
    this.clear();
    if (maskBlob) await this.setMask(maskBlob);
    this.box.hidden = false;
    this.onChange();
  }

  // A black and white mask image painted back onto the canvas (white: painted).
  async setMask(blob) {
    const bitmap = await createImageBitmap(blob);
    const scratch = new OffscreenCanvas(this.width, this.height);
    const g = scratch.getContext("2d");
    g.drawImage(bitmap, 0, 0, this.width, this.height);
    const data = g.getImageData(0, 0, this.width, this.height);
    const out = this.mask.getContext("2d").createImageData(this.width, this.height);
    for (let i = 0; i < data.data.length; i += 4) {
      out.data.set(data.data[i] >= 128 ? [255, 255, 255, 255] : [0, 0, 0, 0], i);
    }
    this.mask.getContext("2d").putImageData(out, 0, 0);
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
  }

  point(e) {
    const rect = this.mask.getBoundingClientRect();
    return [(e.clientX - rect.left) * this.mask.width / rect.width, (e.clientY - rect.top) * this.mask.height / rect.height];
  }

  down(e) {
    e.preventDefault();
    this.mask.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last || !(e.buttons & 1)) return;
    const next = this.point(e);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke(from, to) {
    const g = this.mask.getContext("2d");
    g.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    g.strokeStyle = g.fillStyle = "#fff";
    g.lineWidth = this.size;
    g.lineCap = g.lineJoin = "round";
    g.beginPath();
    g.moveTo(...from);
    g.lineTo(...to);
    g.stroke();
    g.beginPath(); // a click is a dot: a line of no length draws nothing
    g.arc(...to, this.size / 2, 0, 2 * Math.PI);
    g.fill();
  }

  // The mask canvas's RGBA values: alpha 128 or more is painted (white in maskBlob).
  pixels() {
    return this.mask.getContext("2d").getImageData(0, 0, this.width, this.height).data;
  }

  // Whether anything is painted now (the eraser may have taken it all back).
  get anyPainted() {
    const alpha = this.pixels();
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] >= 128) return true;
    return false;
  }

  // The mask as the server takes it: a PNG, white where painted, black elsewhere (no soft edges: the blur is the
  // server's, by mask_blur).
  maskBlob() {
    const w = this.width, h = this.height;
    const painted = this.pixels();
    const out = new ImageData(w, h);
    for (let i = 0; i < painted.length; i += 4) {
      const v = painted[i + 3] >= 128 ? 255 : 0;
      out.data.set([v, v, v, 255], i);
    }
    const scratch = new OffscreenCanvas(w, h);
    scratch.getContext("2d").putImageData(out, 0, 0);
    return scratch.convertToBlob({ type: "image/png" });
  }
}
