// AudioWorklet for hands-free voice: the microphone's samples become 16-bit little-endian
// mono PCM at the target rate (16 kHz), posted to the page in frames of `frameSamples`
// (50 ms), each with its loudness for the level meter. The page sends them to the server as
// binary WebSocket frames (`voice_stream`). When the audio context already runs at the
// target rate (the page asks for it) no resampling happens; otherwise samples are linearly
// interpolated.

class PcmSender extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.target = opts.targetRate || 16000;
    this.step = sampleRate / this.target; // input samples per output sample
    this.size = opts.frameSamples || 800;
    this.frame = new Int16Array(this.size);
    this.filled = 0;
    this.energy = 0;
    this.t = 0; // where the next output sample falls, in input samples from this block's start
    this.last = 0; // the previous block's last sample
  }

  push(x) {
    const v = Math.max(-1, Math.min(1, x));
    this.energy += v * v;
    this.frame[this.filled++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    if (this.filled === this.size) {
      const level = Math.sqrt(this.energy / this.size);
      this.port.postMessage({ pcm: this.frame.buffer, level }, [this.frame.buffer]);
      this.frame = new Int16Array(this.size);
      this.filled = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input || !input.length) return true;
    if (this.step === 1) {
      for (let i = 0; i < input.length; i++) this.push(input[i]);
      return true;
    }
    let t = this.t;
    while (t < input.length - 1) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i < 0 ? this.last : input[i];
      const b = input[i + 1];
      this.push(a + (b - a) * f);
      t += this.step;
    }
    this.t = t - input.length;
    this.last = input[input.length - 1];
    return true;
  }
}

registerProcessor("pcm-sender", PcmSender);
