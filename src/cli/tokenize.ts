import type { Command } from 'commander';
import { tokenizerForModel } from '../models/clip/tokenizer-for-model.js';
import { runCommand } from './errors.js';

const WINDOW = 75;

interface TokenizeFlags {
  model?: string;
  json?: boolean;
  chunks?: boolean;
}

/** `sdwb tokenize`: token ids of a prompt and its length against CLIP's 75-token window. */
export function registerTokenize(program: Command): void {
  program
    .command('tokenize')
    .description("show a prompt's CLIP token ids and its length against the 75-token window")
    .option('--model <dir>', 'model folder (its tokenizer/), or a single-file checkpoint (shipped CLIP vocabulary)')
    .option('--json', 'print {"input_ids": [...]} padded to 77 as the text encoder receives it')
    .option('--chunks', "AUTOMATIC1111's long-prompt chunks of 75 tokens instead of truncation")
    .argument('<prompt...>', 'the prompt (put -- before a prompt that starts with a dash)')
    .action((words: string[], flags: TokenizeFlags) =>
      runCommand('tokenize', async () => {
        const tok = await tokenizerForModel(flags.model);
        const prompt = words.join(' ');
        const content = tok.contentIds(prompt);
        if (flags.json) {
          const inputIds = flags.chunks ? tok.encodeChunked(prompt) : tok.encode(prompt);
          process.stdout.write(`${JSON.stringify({ input_ids: inputIds, num_tokens: content.length, window: WINDOW })}\n`);
          return;
        }
        const tokens = tok.tokenize(prompt);
        process.stdout.write(`tokens: ${tokens.map((t, i) => `${t}(${content[i]})`).join(' ')}\n`);
        const over = content.length - WINDOW;
        const verdict =
          over > 0
            ? flags.chunks
              ? `split into ${tok.encodeChunked(prompt).length} chunks of 75`
              : `${over} over: truncated after "${tokens[WINDOW - 1] ?? ''}"`
            : 'fits';
        process.stdout.write(`${content.length}/${WINDOW} tokens (${verdict})\n`);
        const ids = flags.chunks ? tok.encodeChunked(prompt) : [tok.encode(prompt)];
        for (const chunk of ids) process.stdout.write(`input_ids: ${JSON.stringify(chunk)}\n`);
      }),
    );
}
